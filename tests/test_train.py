"""LoRA training (issue 4): the LightningModule, checkpoints, resume, NaN guard, Ctrl-C, W&B mirror.

In-process tests train the tiny Kolors on in-memory batches built the way the cache builds them
(VAE latent mean x scaling factor, the pipeline's own encode_prompt, micro-conditioning ids).
"""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
from PIL import Image

from kolors_story.config import OptimSettings
from kolors_story.models.checkpointing import set_gradient_checkpointing
from kolors_story.records import last_checkpoint, read_metrics
from kolors_story.train.devices import resolve_precision
from kolors_story.train.job import run_training
from kolors_story.train.loader import StreamBatchSampler
from kolors_story.train.module import KolorsLoraModule
from kolors_story.train.optimizers import lr_lambda
from tests.helpers import compose, settings


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are too small to gain from threads; on a shared 2-core box a second
    thread per process mostly adds contention."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _cfg(tmp_path, *extra):
    """The typed settings of a tiny CPU run into ``tmp_path``, no W&B, no story renders."""
    return settings("train", ["model=tiny", "logger=none", "validate=false", f"output_dir={tmp_path}",
                              "trainer.progress_bar=false", *extra])


def _lora_state(run_dir):
    from kolors_story.lora import read_lora

    return read_lora(last_checkpoint(run_dir) / "lora.safetensors").state_dict


# ------------------------------------------------------------------------------- the module


def test_overfit_fixed_batch_lora_changes_base_frozen(tiny_model_dir, tiny_batches):
    from kolors_story.lora import add_lora
    from kolors_story.models.loading import load_pipeline

    L.seed_everything(0, verbose=False)
    pipe = load_pipeline(tiny_model_dir, text_encoder=False)
    assert pipe.text_encoder is None  # never resident while training
    unet = pipe.unet
    unet.requires_grad_(False)
    add_lora(unet, rank=4, alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    set_gradient_checkpointing(unet, True)
    unet.train()
    module = KolorsLoraModule(unet, dict(pipe.scheduler.config), OptimSettings(lr=2e-2, weight_decay=0.0))
    assert module.noise_scheduler.config.num_train_timesteps == 1100
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    trainable = set(n.removeprefix("unet.") for n in module.trainable_names())
    assert trainable and all("lora_" in n for n in trainable)

    # A truly fixed batch: same two items, same noise and timesteps at every step.
    fixed = {k: torch.stack([b[k] for b in tiny_batches[:2]]) for k in tiny_batches[0]}
    fixed["noise_seed"] = torch.tensor([11, 12])
    steps = 20
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(module, torch.utils.data.DataLoader([fixed] * steps, batch_size=None))
    losses = [float(x) for x in module.step_losses]
    assert len(losses) == steps and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.75 * losses[0], losses

    after = unet.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all("lora_" in k for k in changed)
    assert set(changed) == {k for k in before if "lora_B" in k or "lora_A" in k}


def test_checkpointing_keeps_the_prompt_projections_same_gradients_less_recompute(tiny_model_dir):
    """The backward redoes every checkpointed block except the frozen key and value projections of
    the prompt in its cross-attention (their LoRA still runs), and the gradients do not change."""
    from kolors_story.accounting import FlopCount
    from kolors_story.lora import add_lora
    from kolors_story.models.loading import load_pipeline
    from kolors_story.plan.count import unet_inputs

    torch.manual_seed(0)
    unet = load_pipeline(tiny_model_dir, text_encoder=False).unet.requires_grad_(False)
    rank = 4
    add_lora(unet, rank=rank, alpha=rank)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)  # a trained LoRA: gradients reach lora_A too
    unet.train()
    batch, tokens = 2, 256
    x, t, enc, added = unet_inputs(unet, batch, 64, 64, tokens, torch.float32, "cpu")
    for v in (x, enc, *added.values()):
        v.normal_()

    def step():
        unet.zero_grad(set_to_none=True)
        with FlopCount() as flops:
            unet(x, t, encoder_hidden_states=enc, added_cond_kwargs=added, return_dict=False)[0].square().mean().backward()
        return [p.grad.clone() for p in unet.parameters() if p.requires_grad], flops.total

    unet.enable_gradient_checkpointing()  # diffusers' own: recomputes everything
    plain_grads, plain_flops = step()
    set_gradient_checkpointing(unet, True)
    kept_grads, kept_flops = step()
    set_gradient_checkpointing(unet, False)
    _, no_checkpointing_flops = step()

    assert all(torch.equal(a, b) for a, b in zip(plain_grads, kept_grads))
    projections = [getattr(m, n) for m in unet.modules() if getattr(m, "is_cross_attention", False) for n in ("to_k", "to_v")]
    assert len(projections) == 2 * sum(1 for m in unet.modules() if getattr(m, "is_cross_attention", False)) > 0
    not_redone = sum(2 * batch * tokens * p.in_features * p.out_features for p in projections)
    assert plain_flops - kept_flops == not_redone
    assert no_checkpointing_flops < kept_flops
    assert not unet._kept_prompt_linears and all("forward" not in p.base_layer.__dict__ for p in projections)


def test_min_snr_noise_offset_and_schedule(tiny_model_dir, tiny_batches):
    from kolors_story.lora import add_lora
    from kolors_story.models.loading import load_pipeline

    pipe = load_pipeline(tiny_model_dir, text_encoder=False)
    add_lora(pipe.unet, rank=2, alpha=2)
    batch = {k: torch.stack([b[k] for b in tiny_batches]) for k in tiny_batches[0]}
    batch["noise_seed"] = torch.arange(4)
    plain = KolorsLoraModule(pipe.unet, dict(pipe.scheduler.config), OptimSettings())
    snr = KolorsLoraModule(pipe.unet, dict(pipe.scheduler.config), OptimSettings(), min_snr_gamma=5.0)
    off = KolorsLoraModule(pipe.unet, dict(pipe.scheduler.config), OptimSettings(), noise_offset=0.1)
    with torch.no_grad():
        a, b, c = (m.compute_loss(batch).item() for m in (plain, snr, off))
        again = plain.compute_loss(batch).item()
    assert a == again  # noise + timesteps come from the per-sample seeds only
    assert b != a and c != a
    _, t = plain.noise_and_timesteps(batch["latents"], batch["noise_seed"])
    w = snr.snr_weights(t)
    assert torch.all(w <= 1.0 + 1e-6) and torch.all(w > 0)
    # Min-SNR-gamma (Hang et al. 2023), epsilon targets: w = min(SNR, gamma) / SNR, SNR = a / (1 - a)
    # on the Kolors schedule (1100 steps, scaled_linear 0.00085..0.014). Low timesteps (SNR > 5) are
    # down-weighted, high ones (SNR < 5) keep weight 1.
    known = torch.tensor([0, 50, 200, 500, 1099])
    betas = torch.linspace(0.00085**0.5, 0.014**0.5, 1100, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, dim=0)[known]
    snr_t = ac / (1 - ac)
    expected = torch.clamp(snr_t, max=5.0) / snr_t
    assert snr.snr_weights(known).tolist() == pytest.approx(expected.tolist(), rel=1e-4)  # fp32 schedule
    assert expected[0] < 0.01 and expected[-1] == 1.0  # the schedule spans both sides of gamma
    f = lr_lambda("cosine", 2, 10)
    assert [round(f(s), 3) for s in (0, 1, 2, 10)] == [0.333, 0.667, 1.0, 0.0]
    assert lr_lambda("constant", 0, 10)(7) == 1.0
    with pytest.raises(ValueError, match="optim.schedule"):
        lr_lambda("linear", 0, 10)


def test_sampler_cycles_dataset_and_shards_ranks():
    s = StreamBatchSampler(n_items=3, batch_size=2, batches_per_epoch=5, seed=1)
    assert len(s) == 5
    idx = [i for b in s.batches(0) for i, _ in b]
    assert len(idx) == 10 and {idx.count(i) for i in range(3)} <= {3, 4}  # cycled, not random with gaps
    assert s.batches(0) == s.batches(0) and s.batches(0) != s.batches(1)
    r0, r1 = s.batches(0, 0, 2), s.batches(0, 1, 2)
    seeds = [x for b in r0 + r1 for _, x in b]
    assert len(set(seeds)) == len(seeds)  # every sample of every rank has its own noise
    assert StreamBatchSampler(n_items=7, batch_size=2, batches_per_epoch=None, seed=0).__len__() == 4


def test_precision_fallback_on_cpu(capsys):
    with pytest.warns(RuntimeWarning, match="needs a GPU"):
        assert resolve_precision("16-mixed", "auto") == "32"
    assert "precision 32" in capsys.readouterr().out
    assert resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    with pytest.raises(ValueError, match="trainer.precision"):
        resolve_precision("8-bit", "cpu")


# ------------------------------------------------------------------------- run, resume, NaN


class _InterruptAt(L.Callback):
    """Ctrl-C as Lightning sees it: a KeyboardInterrupt raised inside fit()."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


class _NanAt(L.Callback):
    """Injects a NaN into the batch about to be trained at ``step`` (what an fp16 overflow gives)."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            batch["latents"][0, 0, 0, 0] = float("nan")


RUN = ["trainer.batch_size=2", "trainer.steps_per_epoch=3", "trainer.max_epochs=null", "optim.lr=1e-3",
       "lora.rank=4", "lora.dropout=0.1"]


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("optim", [["optim=prodigy"], ["optim=adafactor", "optim.schedule=cosine_with_restarts",
                                                              "optim.cycles=2", "optim.warmup_steps=1"]])
def test_other_optimizers_train_and_resume_exactly(tmp_path, tiny_batches, optim):
    n = 6
    straight = run_training(_cfg(tmp_path / "a", *RUN, *optim, f"trainer.max_steps={n}",
                                 "trainer.checkpoint_every_n_steps=100"), tmp_path / "a", tiny_batches)
    assert straight.status == "finished" and straight.step == n
    b = tmp_path / "b"  # stopped after step 3 (the schedule keeps its length), then resumed
    cfg = _cfg(b, *RUN, *optim, f"trainer.max_steps={n}", "trainer.checkpoint_every_n_steps=100")
    assert run_training(cfg, b, tiny_batches, extra_callbacks=[_InterruptAt(3)]).status == "interrupted"
    resumed = run_training(cfg, b, tiny_batches, resume_from=last_checkpoint(b) / "trainer_state.ckpt")
    assert resumed.status == "finished" and resumed.step == n
    assert _max_diff(_lora_state(b), _lora_state(tmp_path / "a")) <= 1e-6
    plain = run_training(_cfg(tmp_path / "c", *RUN, f"trainer.max_steps={n}", "trainer.checkpoint_every_n_steps=100"),
                         tmp_path / "c", tiny_batches)
    assert plain.status == "finished"
    assert _max_diff(_lora_state(tmp_path / "c"), _lora_state(tmp_path / "a")) > 1e-4  # another optimiser was used
    lrs = [r["lr"] for r in read_metrics(tmp_path / "a") if r["type"] == "train"]
    if "optim=adafactor" in optim:  # warmup 1 step, then two cosine cycles over the remaining 5
        assert lrs[0] < lrs[1] and lrs[-1] < lrs[1] and any(b > a for a, b in zip(lrs[2:], lrs[3:]))


def test_validation_loss_is_fixed_for_a_lora_and_moves_with_training(tmp_path, tiny_batches, tiny_model_dir):
    from kolors_story.config import OptimSettings
    from kolors_story.lora import add_lora
    from kolors_story.models.loading import load_pipeline
    from kolors_story.train.held_out import held_out_loss, split_items

    runs = {}
    for name in ("a", "b"):  # the same run twice: the same validation losses, to the bit
        cfg = _cfg(tmp_path / name, *RUN, "trainer.validation_split=1", "trainer.max_steps=4",
                   "trainer.checkpoint_every_n_steps=2")
        result = run_training(cfg, tmp_path / name, tiny_batches)
        assert result.status == "finished"
        runs[name] = [r["val_loss"] for r in read_metrics(tmp_path / name) if r["type"] == "checkpoint"]
    assert runs["a"] == runs["b"] and len(runs["a"]) == 2 and runs["a"][0] != runs["a"][1]
    train, held = split_items(tiny_batches, 1, cfg.trainer.seed)
    assert len(train) == 3 and len(held) == 1  # the held-out item is never trained on
    pipe = load_pipeline(tiny_model_dir, text_encoder=False)
    add_lora(pipe.unet, rank=cfg.lora.rank, alpha=cfg.lora.alpha, target_modules=list(cfg.lora.target_modules))
    untrained = KolorsLoraModule(pipe.unet, dict(pipe.scheduler.config), OptimSettings())
    base = held_out_loss(untrained, held, cfg.trainer.validation_timesteps, cfg.trainer.seed)
    assert base == held_out_loss(untrained, held, cfg.trainer.validation_timesteps, cfg.trainer.seed)
    assert abs(base - runs["a"][-1]) > 1e-6  # a trained LoRA scores differently from a fresh one


class _RawWeights(L.Callback):
    """The LoRA weights after every optimizer step (what the EMA follows)."""

    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({n.removeprefix("unet.").replace(".default", ""): p.detach().clone()
                           for n, p in pl_module.named_parameters() if p.requires_grad})


def test_ema_weights_equal_a_reference_average_and_resume_exactly(tmp_path, tiny_batches):
    from kolors_story.lora import read_lora

    n, decay = 5, 0.6
    ema = ["trainer.ema.enabled=true", f"trainer.ema.decay={decay}", "trainer.checkpoint_every_n_steps=100",
           "trainer.save_dtype=float32"]  # the average itself, to 1e-6: files at full precision
    raw = _RawWeights()
    run = run_training(_cfg(tmp_path / "a", *RUN, *ema, f"trainer.max_steps={n}"), tmp_path / "a", tiny_batches,
                       extra_callbacks=[raw])
    assert run.status == "finished" and len(raw.steps) == n
    reference = {k: v.clone() for k, v in raw.steps[0].items()}  # diffusers' EMAModel: the 1st update copies
    for step, weights in enumerate(raw.steps[1:], start=1):
        d = min(decay, (1 + step) / (10 + step))
        reference = {k: d * reference[k] + (1 - d) * weights[k] for k in reference}
    folder = last_checkpoint(tmp_path / "a")
    got = read_lora(folder / "lora_ema.safetensors")
    assert got.metadata["ema"] is True and (folder / "lora_kohya_ema.safetensors").is_file()
    assert (folder / "lora_diffsynth_ema.ckpt").is_file()
    keys = {k.replace(".weight", ""): k for k in got.state_dict}
    assert len(keys) == len(reference)
    for name, value in reference.items():
        assert torch.allclose(got.state_dict[keys[name.replace(".weight", "")]], value, atol=1e-6), name
    raw_file = read_lora(folder / "lora.safetensors").state_dict
    assert _max_diff(raw_file, got.state_dict) > 1e-4  # the raw weights are exported as they are
    # stopped at step 2 and resumed: the same average
    b = tmp_path / "b"
    cfg = _cfg(b, *RUN, *ema, f"trainer.max_steps={n}")
    assert run_training(cfg, b, tiny_batches, extra_callbacks=[_InterruptAt(2)]).status == "interrupted"
    assert run_training(cfg, b, tiny_batches, resume_from=last_checkpoint(b) / "trainer_state.ckpt").status == "finished"
    assert _max_diff(read_lora(last_checkpoint(b) / "lora_ema.safetensors").state_dict, got.state_dict) <= 1e-6


def test_loss_and_timestep_knobs(tiny_model_dir, tiny_batches):
    from kolors_story.config import LossSettings, OptimSettings
    from kolors_story.models.loading import load_pipeline
    from kolors_story.train.module import sample_generators

    pipe = load_pipeline(tiny_model_dir, text_encoder=False)
    config = dict(pipe.scheduler.config)

    def module(**loss):
        return KolorsLoraModule(pipe.unet, config, OptimSettings(), loss=LossSettings(**loss))

    seeds = torch.arange(2000)
    latents = torch.zeros(2000, 4, 1, 1)
    # the default draws exactly what the trainer always drew: randint(0, 1100) from each sample's generator
    _, t = module().noise_and_timesteps(latents, seeds)
    assert t.tolist() == [int(torch.randint(0, 1100, (1,), generator=g)) for g in sample_generators(seeds)]
    means = {}
    for kind in ("logit_normal", "low", "high"):
        _, t = module(timestep_distribution=kind, timestep_min=100, timestep_max=900).noise_and_timesteps(latents, seeds)
        assert int(t.min()) >= 100 and int(t.max()) < 900, kind
        means[kind] = float(t.float().mean())
    uniform = float(module(timestep_min=100, timestep_max=900).noise_and_timesteps(latents, seeds)[1].float().mean())
    assert means["low"] < uniform - 100 < uniform + 100 < means["high"] and abs(means["logit_normal"] - 500) < 30
    _, t_ln = module(timestep_distribution="logit_normal", timestep_min=100, timestep_max=900).noise_and_timesteps(
        latents, seeds)
    assert float(t_ln.float().std()) < float(t.float().std())  # concentrated in the middle

    batch = {k: torch.stack([b[k] for b in tiny_batches]) for k in tiny_batches[0]}
    batch["noise_seed"] = torch.arange(4)
    with torch.no_grad():
        losses = {name: module(**kw).compute_loss(batch).item() for name, kw in {
            "mse": {}, "zero_perturbation": {"input_perturbation": 0.0}, "huber": {"type": "huber"},
            "smooth_l1": {"type": "smooth_l1"}, "debiased": {"debiased_estimation": True},
            "perturbed": {"input_perturbation": 0.1}}.items()}
        m = module(debiased_estimation=True)
        noise, steps = m.noise_and_timesteps(batch["latents"], batch["noise_seed"])
        manual = (m.per_sample_loss(batch, noise, steps) * m.debiased_weights(steps)).mean().item()
    assert losses["zero_perturbation"] == losses["mse"]
    assert len({round(v, 9) for v in losses.values()}) == 5 and all(map(math.isfinite, losses.values()))
    assert losses["debiased"] == pytest.approx(manual, rel=1e-6)
    ac = m.alphas_cumprod[steps]
    assert m.debiased_weights(steps).tolist() == pytest.approx((1 / torch.sqrt((ac / (1 - ac)).clamp(max=1000))).tolist())


def test_caption_variants_and_dropout_resume_exactly(tmp_path, tiny_batches):
    # per image two caption variants (the second: other text features) and a 30 % caption dropout
    variants = [[b, {**b, "prompt_embeds": b["prompt_embeds"].flip(0)}] for b in tiny_batches]
    empty = {"prompt_embeds": torch.zeros_like(tiny_batches[0]["prompt_embeds"]),
             "pooled_prompt_embeds": torch.zeros_like(tiny_batches[0]["pooled_prompt_embeds"])}
    n = 6
    extra = [*RUN, f"trainer.max_steps={n}", "trainer.checkpoint_every_n_steps=100", "dataset.caption_dropout=0.3"]
    straight = run_training(_cfg(tmp_path / "a", *extra), tmp_path / "a", variants, empty_caption=empty)
    assert straight.status == "finished"
    b = tmp_path / "b"
    cfg = _cfg(b, *extra)
    assert run_training(cfg, b, variants, empty_caption=empty, extra_callbacks=[_InterruptAt(3)]).status == "interrupted"
    assert run_training(cfg, b, variants, empty_caption=empty,
                        resume_from=last_checkpoint(b) / "trainer_state.ckpt").status == "finished"
    assert _max_diff(_lora_state(b), _lora_state(tmp_path / "a")) <= 1e-6
    plain = run_training(_cfg(tmp_path / "c", *extra[:-1]), tmp_path / "c", tiny_batches)
    assert plain.status == "finished" and _max_diff(_lora_state(tmp_path / "c"), _lora_state(tmp_path / "a")) > 1e-5
    with pytest.raises(Exception, match="caption_dropout needs the empty caption"):
        run_training(_cfg(tmp_path / "d", *extra), tmp_path / "d", variants)


def test_training_on_buckets_of_two_sizes(tmp_path, tiny_batches):
    wide = [{**b, "latents": torch.cat([b["latents"], b["latents"].flip(-1)], dim=-1),
             "add_time_ids": torch.tensor([64.0, 128.0, 0.0, 0.0, 64.0, 128.0])} for b in tiny_batches[:2]]
    items = [*tiny_batches, *wide]
    result = run_training(_cfg(tmp_path, *RUN, "trainer.max_steps=6", "trainer.checkpoint_every_n_steps=100",
                               "dataset.buckets=[[64,64],[64,128]]"), tmp_path, items)
    assert result.status == "finished" and result.step == 6
    with pytest.raises(RuntimeError, match="stack expects each tensor to be equal size"):  # what buckets prevent
        run_training(_cfg(tmp_path / "mixed", *RUN, "trainer.max_steps=6", "trainer.checkpoint_every_n_steps=100",
                          "trainer.batch_size=6"), tmp_path / "mixed", items)


@pytest.mark.parametrize("adapter", [["lora.type=dora"], ["lora.type=loha", "lora.dropout=0"], ["lora.type=lokr", "lora.rank=2", "lora.dropout=0"],
                                     ["lora=locon"]], ids=["dora", "loha", "lokr", "locon"])
def test_each_adapter_type_trains_and_its_files_agree(tmp_path, tiny_batches, tiny_model_dir, adapter):
    """A few steps of each type; the checkpoint's files (the formats that hold it) read back to one
    adapter that moved away from its zero start; the record names the formats skipped and why."""
    from types import SimpleNamespace

    from kolors_story.lora import load_lora_into_pipeline
    from kolors_story.models.loading import load_pipeline

    result = run_training(_cfg(tmp_path, *RUN, *adapter, "trainer.max_steps=3", "trainer.checkpoint_every_n_steps=100"),
                          tmp_path, tiny_batches)
    assert result.status == "finished" and result.step == 3
    record = [r for r in read_metrics(tmp_path) if r["type"] == "checkpoint"][-1]
    assert set(record["files"]) | set(record.get("skipped", {})) == {"diffusers", "kohya", "diffsynth"}
    assert "diffsynth" in record["skipped"] and "kohya" in record["files"]
    batch = {k: torch.stack([b[k] for b in tiny_batches[:1]]) for k in tiny_batches[0]}

    def output(path=None):
        unet = load_pipeline(tiny_model_dir, text_encoder=False).unet
        if path is not None:
            load_lora_into_pipeline(SimpleNamespace(unet=unet), tmp_path / path)
        with torch.no_grad():
            return unet(batch["latents"], torch.tensor([500]), encoder_hidden_states=batch["prompt_embeds"],
                        added_cond_kwargs={"text_embeds": batch["pooled_prompt_embeds"],
                                           "time_ids": batch["add_time_ids"]}).sample

    outputs = [output(path) for path in record["files"].values()]
    assert all(float((o - outputs[0]).abs().max()) < 1e-5 for o in outputs)
    assert float((outputs[0] - output()).abs().max()) > 1e-6  # trained: no longer the base model


def test_8bit_adamw_needs_a_gpu_and_unknown_names_are_refused(tmp_path):
    from kolors_story.train.checks import check_train

    with pytest.raises(ValueError, match="adamw8bit runs on CUDA GPUs only"):
        check_train(_cfg(tmp_path, "optim.name=adamw8bit"))
    with pytest.raises(ValueError, match="optim.name='sgd'.*adamw, adamw8bit, prodigy, adafactor"):
        check_train(_cfg(tmp_path, "optim.name=sgd"))
    with pytest.raises(ValueError, match="optim.schedule='step'"):
        check_train(_cfg(tmp_path, "optim.schedule=step"))


def test_resume_equals_straight_run_at_epoch_boundary_and_mid_epoch_after_ctrl_c(tmp_path, tiny_batches):
    n = 8
    straight = run_training(_cfg(tmp_path / "a", *RUN, f"trainer.max_steps={n}", "trainer.checkpoint_every_n_steps=100"),
                            tmp_path / "a", tiny_batches)
    assert straight.status == "finished" and straight.step == n
    want = _lora_state(tmp_path / "a")

    # 1. stop at an epoch boundary (3 batches/epoch), resume with the full budget
    b = tmp_path / "b"
    first = run_training(_cfg(b, *RUN, "trainer.max_steps=3", "trainer.checkpoint_every_n_steps=100"), b, tiny_batches)
    assert first.status == "finished" and last_checkpoint(b).name == "step-000003"
    resumed = run_training(_cfg(b, *RUN, f"trainer.max_steps={n}", "trainer.checkpoint_every_n_steps=100"), b,
                           tiny_batches, resume_from=last_checkpoint(b) / "trainer_state.ckpt")
    assert resumed.status == "finished" and resumed.step == n
    assert _max_diff(_lora_state(b), want) <= 1e-6

    # 2. Ctrl-C in the middle of epoch 2 saves a checkpoint; resuming from it gives the same LoRA
    c = tmp_path / "c"
    cfg = _cfg(c, *RUN, f"trainer.max_steps={n}", "trainer.checkpoint_every_n_steps=100")
    stopped = run_training(cfg, c, tiny_batches, extra_callbacks=[_InterruptAt(4)])
    assert stopped.status == "interrupted" and last_checkpoint(c).name == "step-000004"
    assert (last_checkpoint(c) / "trainer_state.ckpt").exists() and (last_checkpoint(c) / "lora_kohya.safetensors").exists()
    resumed = run_training(cfg, c, tiny_batches, resume_from=last_checkpoint(c) / "trainer_state.ckpt")
    assert resumed.status == "finished" and resumed.step == n
    assert _max_diff(_lora_state(c), want) <= 1e-6

    records = read_metrics(c)
    assert [r["step"] for r in records if r["type"] == "train"] == list(range(1, n + 1))
    assert [r["status"] for r in records if r["type"] == "status"] == ["interrupted", "finished"]
    ckpts = [r for r in records if r["type"] == "checkpoint"]
    assert [r["step"] for r in ckpts] == [4, 8] and ckpts[0]["interrupted"] is True
    # the loss curve of the resumed run is the straight run's, step for step
    straight_loss = [r["loss"] for r in read_metrics(tmp_path / "a") if r["type"] == "train"]
    assert [r["loss"] for r in records if r["type"] == "train"] == pytest.approx(straight_loss, abs=1e-6)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_batches, capsys):
    cfg = _cfg(tmp_path, *RUN, "trainer.max_steps=6", "trainer.checkpoint_every_n_steps=1")
    result = run_training(cfg, tmp_path, tiny_batches, extra_callbacks=[_NanAt(2)])
    assert result.status == "failed" and result.step == 2
    assert "not finite" in result.error and "fp16-fix VAE" in result.error and "bf16" in result.error
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()) == ["step-000001", "step-000002"]
    assert last_checkpoint(tmp_path).name == "step-000002"
    status = read_metrics(tmp_path)[-1]
    assert status["type"] == "status" and status["status"] == "failed" and "fp16" in status["error"]
    assert "last good checkpoint is kept" in capsys.readouterr().out
    # nothing half-written is left behind
    assert not list((tmp_path / "checkpoints").glob(".*"))


# ------------------------------------------------------------------------------------- W&B


def test_wandb_offline_run_holds_loss_panels_and_score_table(tmp_path, tiny_batches, story):
    from tests.wandb_reader import read_wandb_run

    scenes, embeds = story
    cfg = settings("train", ["model=tiny", "logger=wandb", "logger.mode=offline", f"output_dir={tmp_path}",
                             "trainer.progress_bar=false", *RUN, "trainer.max_steps=4",
                             "trainer.checkpoint_every_n_steps=2", "sampler.steps=2"])
    result = run_training(cfg, tmp_path, tiny_batches, scenes=scenes, story_embeds=embeds, dataset_hash="d" * 64)
    assert result.status == "finished"
    records = read_metrics(tmp_path)
    ckpts = [r for r in records if r["type"] == "checkpoint"]
    assert [c["step"] for c in ckpts] == [2, 4]
    for c in ckpts:  # images, panel and scores on disk, as recorded
        assert len(c["scores"]) == 8 and c["mean"] == pytest.approx(sum(c["scores"]) / 8)
        assert c["min"] == min(c["scores"]) and c["passed"] is False  # the tiny scorer gives ~0
        assert (tmp_path / c["panel"]).exists() and all((tmp_path / p).exists() for p in c["images"])
        scores = json.loads((tmp_path / c["dir"] / "scores.json").read_text())
        assert scores["scores"] == c["scores"] and len(scores["scenes"]) == 8
        # the story metrics: CLIP-T against the English prompts (kept in scores.json for evaluate.py)
        assert scores["clip_t"] == pytest.approx(c["clip_t"]) and len(scores["alignment"]) == 8
        assert isinstance(c["clip_t"], float) and all(sc["prompt_en"] for sc in scores["scenes"])
        assert 0.0 <= c["copy_paste"] <= 1.0 and c["story_objective"] == pytest.approx(scores["story_objective"])
        for name in ("lora.safetensors", "lora_kohya.safetensors", "lora_diffsynth.ckpt", "trainer_state.ckpt"):
            assert (tmp_path / c["dir"] / name).exists()
    from kolors_story.lora import read_lora

    lora = read_lora(tmp_path / ckpts[-1]["dir"] / "lora_diffsynth.ckpt")
    assert (lora.rank, lora.metadata["dataset_hash"], lora.metadata["step"]) == (4, "d" * 64, 4)
    assert lora.metadata["base_model_hash"] and lora.metadata["config"]["lora"]["rank"] == 4

    run = read_wandb_run(result.wandb_dir)
    assert run["config"]["lora"]["rank"] == 4 and run["config"]["trainer"]["max_steps"] == 4
    train = [r for r in records if r["type"] == "train"]
    history = {row["_step"]: row for row in run["history"]}
    assert sorted(history) == [r["step"] for r in train]
    for r in train:  # metrics.jsonl and W&B agree, step by step
        assert history[r["step"]]["train/loss"] == pytest.approx(r["loss"], rel=1e-9)
        assert history[r["step"]]["train/lr"] == pytest.approx(r["lr"], rel=1e-9)
    files = result.wandb_dir / "files"
    for c in ckpts:
        row = history[c["step"]]
        assert row["val/mean"] == pytest.approx(c["mean"])
        for key in ("coherence", "clip_t", "copy_paste", "story_objective"):
            assert row[f"val/{key}"] == pytest.approx(c[key])
        panel = files / row["val/panel"]["path"]
        assert panel.exists() and Image.open(panel).size == Image.open(tmp_path / c["panel"]).size
        table = json.loads((files / row["val/scores"]["path"]).read_text())
        score_col = table["columns"].index("score")
        assert [r[score_col] for r in table["data"]] == pytest.approx(c["scores"])
        assert [r[table["columns"].index("scene")] for r in table["data"]] == list(range(1, 9))


def test_wandb_init_failure_does_not_stop_training(tmp_path, tiny_batches, monkeypatch, capsys):
    import wandb

    def broken_init(*args, **kwargs):
        raise wandb.errors.CommError("no route to api.wandb.ai")

    monkeypatch.setattr(wandb, "init", broken_init)
    cfg = settings("train", ["model=tiny", "logger=wandb", "logger.mode=online", "validate=false",
                             f"output_dir={tmp_path}", "trainer.progress_bar=false", *RUN, "trainer.max_steps=2"])
    with pytest.warns(RuntimeWarning, match="W&B init failed"):
        result = run_training(cfg, tmp_path, tiny_batches)
    assert result.status == "finished" and result.step == 2 and "no route" in result.wandb_error
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2]
    assert records[-1] == {"type": "status", "status": "finished", "error": None, "step": 2}
    assert "continuing with metrics.jsonl only" in capsys.readouterr().out


def test_wandb_each_job_gets_its_own_run_grouped_by_sweep(tmp_path, tiny_batches):
    """In a multirun every job finishes its W&B run: job 2 must not log into job 1's run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from kolors_story.config.compose import run_identity, to_settings
    from tests.wandb_reader import read_wandb_run

    runs = []
    for num, rank in enumerate((2, 4)):
        job = tmp_path / f"{num}_rank{rank}"
        cfg = compose("train", ["model=tiny", "logger=wandb", "logger.mode=offline", "validate=false",
                                f"output_dir={job}", "trainer.progress_bar=false", *RUN, "trainer.max_steps=2",
                                f"lora.rank={rank}"])
        with open_dict(cfg):
            cfg.hydra.mode = RunMode.MULTIRUN
            cfg.hydra.sweep.dir = str(tmp_path)
            cfg.hydra.job.override_dirname = f"lora.rank={rank}"
        HydraConfig.instance().set_config(cfg)
        try:
            runs.append(run_training(to_settings(cfg, "train"), job, tiny_batches, identity=run_identity()))
        finally:
            HydraConfig.instance().cfg = None
    read = [read_wandb_run(r.wandb_dir) for r in runs]
    assert read[0]["run"]["id"] != read[1]["run"]["id"]
    assert [r["run"]["group"] for r in read] == [str(tmp_path)] * 2
    assert [r["run"]["name"] for r in read] == ["lora.rank=2", "lora.rank=4"]
    assert [[h["_step"] for h in r["history"]] for r in read] == [[1, 2], [1, 2]]
    assert [r["config"]["lora"]["rank"] for r in read] == [2, 4]


def test_accumulation_counts_optimizer_steps(tmp_path, tiny_batches):
    class Count(L.Callback):
        batches = 0

        def on_train_batch_end(self, *a):
            Count.batches += 1

    cfg = _cfg(tmp_path, *RUN, "trainer.accumulate_grad_batches=2", "trainer.steps_per_epoch=4",
               "trainer.max_steps=3", "trainer.checkpoint_every_n_steps=2")
    result = run_training(cfg, tmp_path, tiny_batches, extra_callbacks=[Count()])
    assert result.status == "finished" and result.step == 3 and Count.batches == 6
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3]
    assert [r["step"] for r in records if r["type"] == "checkpoint"] == [2, 3]


def test_resume_errors_name_the_problem(tmp_path):
    from kolors_story.config.saved import resume_config
    from kolors_story.errors import TrainingError

    with pytest.raises(TrainingError, match="no such folder"):
        resume_config(compose("train", [f"resume={tmp_path / 'nope'}"]))
    (tmp_path / "run").mkdir()
    with pytest.raises(TrainingError, match="saved no checkpoint"):
        resume_config(compose("train", [f"resume={tmp_path / 'run'}"]))
