import pytest

from focus_ref.config import FocusConfig


@pytest.mark.parametrize("preset", ["tiny", "small", "paper"])
def test_json_round_trip(preset, tmp_path):
    cfg = FocusConfig.from_preset(preset)
    cfg.to_json(tmp_path / "config.json")
    back = FocusConfig.from_json(tmp_path / "config.json")
    assert back == cfg
    assert back.preset == preset
    assert isinstance(back.encoder.convnext_dims, tuple)


def test_presets_differ_and_paper_has_published_sizes():
    tiny, paper = FocusConfig.tiny(), FocusConfig.paper()
    assert tiny.llm.hidden_size < FocusConfig.small().llm.hidden_size < paper.llm.hidden_size
    assert (paper.llm.hidden_size, paper.llm.num_layers) == (2048, 36)  # Qwen2.5-3B
    assert paper.encoder.convnext_dims == (192, 384, 768, 1536)  # ConvNeXt-L
    assert paper.encoder.convnext_depths == (3, 3, 27, 3)
    assert paper.diffusion.block_out_channels == (320, 640, 1280)  # SDXL UNet


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['hiden_size'\] in FocusConfig.llm"):
        FocusConfig.from_dict({"llm": {"hiden_size": 3}})
    with pytest.raises(ValueError, match="unknown config key"):
        FocusConfig.from_dict({"nope": 1})


def test_unknown_preset_and_bad_types():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        FocusConfig.from_preset("huge")
    with pytest.raises(TypeError, match="seed must be an int"):
        FocusConfig.from_dict({"train": {"seed": "seven"}})
    with pytest.raises(TypeError, match="must be a mapping"):
        FocusConfig.from_dict({"llm": 5})


def test_missing_and_corrupt_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        FocusConfig.from_json(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        FocusConfig.from_json(tmp_path / "config.json")
