"""The training loop (focus_ref/train.py): an interrupted stage resumes to exactly the weights
of an uninterrupted run; stage 2 trains only the fusion and the adapter."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from focus_ref import standins, train
from focus_ref.config import FocusConfig, StageConfig
from focus_ref.encoder import DualEncoder
from focus_ref.llm import FocusLLM


class Parts(nn.Module):
    """The two parts stages 0 and 2 touch (FocusModel holds the same attributes)."""

    def __init__(self, cfg, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = DualEncoder(cfg)
        self.llm = FocusLLM(cfg)


@pytest.fixture(scope="module")
def cfg():
    c = FocusConfig.tiny()
    c.llm.num_layers, c.llm.intermediate_size = 2, 256  # keep it quick
    c.train.stage0.steps, c.train.stage0.batch_size, c.train.stage0.ckpt_every = 6, 4, 3
    c.train.stage0.warmup, c.train.lm_seq_len, c.train.text_scenes = 2, 16, 8
    c.train.stage2.steps, c.train.stage2.batch_size, c.train.scene_pool = 3, 2, 16
    return c


class Interrupt(Exception):
    pass


def test_resumed_stage_equals_uninterrupted_run(cfg, tmp_path):
    full = Parts(cfg, seed=0)
    hist_full = train.fit(full, standins.stage0_lm(full, cfg), tmp_path / "full", progress=False)

    part = Parts(cfg, seed=0)
    stage = standins.stage0_lm(part, cfg)
    batch_fn = stage.batch_fn

    def crash_at_4(step):  # the process dies during step 4, after the step-3 checkpoint
        if step == 4:
            raise Interrupt
        return batch_fn(step)

    stage.batch_fn = crash_at_4
    with pytest.raises(Interrupt):
        train.fit(part, stage, tmp_path / "part", progress=False)

    fresh = Parts(cfg, seed=1)  # a new process: different initial weights, then --resume
    hist = train.fit(fresh, standins.stage0_lm(fresh, cfg), tmp_path / "part", resume=True,
                     progress=False)
    assert [h["loss"] for h in hist] == pytest.approx([h["loss"] for h in hist_full])
    want, got = full.state_dict(), fresh.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k


def test_stage2_trains_only_fusion_and_adapter(cfg, tmp_path):
    model = Parts(cfg, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hist = train.stage2(model, cfg, tmp_path, progress=False)
    assert len(hist) >= 1 and "gate" in hist[-1]
    changed = {k.split(".")[0] + "." + k.split(".")[1] for k, v in model.state_dict().items()
               if not torch.equal(v, before[k])}
    assert changed == {"encoder.fusion", "encoder.adapter"}
    assert model.encoder.fusion.gate.item() != 0.0  # the gate has started to open


def test_nan_loss_stops_the_stage_and_keeps_the_last_good_checkpoint(cfg, tmp_path):
    model = Parts(cfg, seed=0)
    stage = standins.stage0_lm(model, cfg)
    loss_fn = stage.loss_fn

    def nan_at_4(batch):  # the loss diverges at step 4, after the step-3 checkpoint
        loss, logs = loss_fn(batch)
        nan_at_4.calls += 1
        return (loss * float("nan") if nan_at_4.calls == 5 else loss), logs
    nan_at_4.calls = 0
    stage.loss_fn = nan_at_4
    with pytest.raises(FloatingPointError, match="step 4.*--resume"):
        train.fit(model, stage, tmp_path, progress=False)
    saved = (tmp_path / stage.name / "state.json").read_text()
    assert '"step": 3' in saved  # the good checkpoint is untouched
    good = load_file(str(tmp_path / stage.name / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in good.values() if v.is_floating_point())


def test_same_seed_gives_the_same_weights_on_several_threads(tmp_path):
    """Two fits of one stage agree bitwise. The loss gathers rows of a table by index, as the
    VQ losses do (`codebook[codes]`); on a multi-threaded CPU that gather's backward adds with
    atomics in thread order unless fit runs torch's deterministic kernels."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))  # one thread is always in order

    def batch_fn(step):
        g = torch.Generator().manual_seed(step)
        return {"codes": torch.randint(0, 256, (16384,), generator=g),
                "target": torch.randn(16384, 64, generator=g)}  # (N,), (N, D)

    weights = []
    try:
        for run in range(2):
            table = nn.Embedding(256, 64)
            torch.nn.init.normal_(table.weight, generator=torch.Generator().manual_seed(0))

            def loss_fn(batch, table=table):
                rows = table.weight[batch["codes"]]  # (N, D): the gather
                return ((rows - batch["target"]) ** 2).mean(), {}

            sc = StageConfig(steps=4, lr=1e-2, batch_size=1, warmup=1, log_every=1, ckpt_every=4)
            train.fit(table, train.Stage(f"run{run}", [table.weight], loss_fn, batch_fn, sc),
                      tmp_path, progress=False)
            weights.append(table.weight.detach().clone())
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(weights[0], weights[1])
    assert not torch.are_deterministic_algorithms_enabled()  # the caller's setting is back
    assert torch.utils.deterministic.fill_uninitialized_memory  # (off only inside fit)


class Clipped(nn.Module):
    """A model carrying a FocusConfig, as FocusModel does: fit reads train.grad_clip from it."""

    def __init__(self, grad_clip):
        super().__init__()
        self.config = FocusConfig.tiny()
        self.config.train.grad_clip = grad_clip
        self.w = nn.Parameter(torch.zeros(64))


@pytest.mark.parametrize("clip, moved", [(0.0, 1e-2), (1.0, 1e-2), (1e-12, 0.0)])
def test_fit_clips_gradients_at_the_configs_grad_clip(tmp_path, clip, moved):
    """Adam's first step moves each weight by about lr whatever the gradient's scale, unless
    the gradient is clipped to near Adam's eps (1e-8): a norm of 1e-12 all but stops it."""
    model, target = Clipped(clip), torch.linspace(-1, 1, 64)
    sc = StageConfig(steps=1, lr=1e-2, batch_size=1, warmup=1, log_every=1, ckpt_every=1)
    stage = train.Stage("clip", [model.w], lambda b: (((model.w - target) ** 2).sum(), {}),
                        lambda step: {}, sc)
    train.fit(model, stage, tmp_path, progress=False)
    assert model.w.detach().abs().max().item() == pytest.approx(moved, abs=1e-5)


def test_slow_parameters_take_slow_mult_times_the_step(tmp_path):
    """Stage.slow (the LLM in stages 3-4, train.llm_lr_mult): Adam's first step moves every
    weight by about the learning rate, so the slow ones move slow_mult x as far."""
    fast, slow = nn.Parameter(torch.zeros(64)), nn.Parameter(torch.zeros(64))
    target = torch.linspace(-1, 1, 64)

    def loss_fn(batch):
        return ((fast - target) ** 2).sum() + ((slow - target) ** 2).sum(), {}

    sc = StageConfig(steps=1, lr=1e-2, batch_size=1, warmup=1, log_every=1, ckpt_every=1)
    stage = train.Stage("slow", [fast, slow], loss_fn, lambda step: {}, sc, slow=[slow],
                        slow_mult=0.1)
    train.fit(nn.ParameterList([fast, slow]), stage, tmp_path, progress=False)
    assert torch.allclose(fast.detach().abs(), torch.full((64,), 1e-2), rtol=1e-3)
    assert torch.allclose(slow.detach().abs(), torch.full((64,), 1e-3), rtol=1e-3)
    runs = []  # slow_mult 1 (the presets): the same weights as a stage without `slow`
    for name, marked in (("plain", False), ("marked", True)):
        w = nn.Parameter(torch.zeros(64))
        stage = train.Stage(name, [w], lambda b, w=w: (((w - target) ** 2).sum(), {}),
                            lambda step: {}, sc, slow=[w] if marked else [], slow_mult=1.0)
        train.fit(nn.ParameterList([w]), stage, tmp_path, progress=False)
        runs.append(w.detach())
    assert torch.equal(*runs)


def test_stage0_read_learns_only_the_answer_after_the_caption(cfg):
    """Stage 0e's rows: the caption, then the question; labels on the answer (and <eos>) only."""
    from focus_ref.llm import IGNORE

    model = Parts(cfg, seed=0)
    c = FocusConfig.from_dict(cfg.to_dict())
    c.train.stage3_scenes, c.train.stage0_read.batch_size = 6, 3
    rows = standins.reading_rows(c, "train", 6)
    assert rows and all(kind != "where" for *_, kind in rows)
    stage = standins.stage0_read(model, c)
    assert {id(p) for p in stage.params} == {id(p) for p in model.llm.parameters()}
    batch = stage.batch_fn(0)
    tok, norm = model.llm.tokenizer, lambda t: " ".join(t.split())
    pairs = {(norm(p), norm(a)) for p, a, _ in rows}
    for ids, labels, keep in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        asked = ids[1:][(labels[1:] == IGNORE) & (keep[1:] == 1)]  # after the opening <eos>
        answer = labels[labels != IGNORE][:-1]  # the answer, without its closing <eos>
        assert (norm(tok.decode(asked)), norm(tok.decode(answer))) in pairs
    assert standins.stage0_read(model, c).batch_fn(0)["input_ids"].equal(batch["input_ids"])


def test_each_process_of_a_launch_takes_its_own_batches_and_only_the_first_saves(tmp_path):
    """DDP: process r of W trains on batch step*W + r (different samples in each process)
    and leaves checkpoints to process 0."""
    from accelerate import Accelerator

    class Rank1(Accelerator):  # what `accelerate launch` with 2 processes says in the second
        num_processes, process_index, is_main_process = 2, 1, False

    seen, w = [], nn.Parameter(torch.zeros(4))

    def batch_fn(step):
        seen.append(step)
        return {}

    sc = StageConfig(steps=3, lr=1e-2, batch_size=1, warmup=1, log_every=1, ckpt_every=1)
    stage = train.Stage("ddp", [w], lambda b: ((w - 1).pow(2).sum(), {}), batch_fn, sc)
    train.fit(nn.ParameterList([w]), stage, tmp_path, progress=False,
              accelerator=Rank1(cpu=True))
    assert seen == [1, 3, 5]
    assert not (tmp_path / "ddp").exists()  # process 0 writes the checkpoints
