"""Recovery distillation after pruning or factorization: the original model teaches the compressed one.

The student (the compressed model) learns the teacher's next-token distributions on calibration text: KL
divergence of the logits at a temperature, plus optionally the mean squared error of the final hidden states,
with AdamW (linear warmup then linear decay, gradients clipped at 1). Run it before quantizing: packed layers
hold no trainable weights. The summary reports the KL to the teacher on held-out calibration windows before
and after.

>>> DistillConfig().needs_teacher, DistillConfig().needs_calibration
(True, True)
>>> DistillConfig(temperature=0)
Traceback (most recent call last):
...
ValueError: distill: temperature must be a number > 0, got 0
"""

from __future__ import annotations

from dataclasses import dataclass

from miaotui.errors import MiaotuiError
from miaotui.recipe import StepConfig, register_step

EVAL_WINDOWS = 8  # held-out calibration windows for the before/after KL


@register_step("distill")
@dataclass(frozen=True)
class DistillConfig(StepConfig):
    """Train the student for `steps` steps of `batch` random calibration windows of `seqlen` tokens.

    hidden_weight: weight of the final-hidden-state MSE next to the logit KL (0: KL only).
    train_embeddings: also train the input embeddings and the output head (by default only the blocks and norms
        learn, which keeps a short run on little text from drifting on rare tokens).

    >>> DistillConfig(steps=100, lr=5e-5).to_dict()["steps"]
    100
    """

    steps: int = 200
    lr: float = 1e-4
    batch: int = 4
    seqlen: int = 256
    temperature: float = 1.0
    hidden_weight: float = 0.0
    weight_decay: float = 0.0
    warmup: float = 0.1  # fraction of the steps
    train_embeddings: bool = False
    seed: int = 0

    def __post_init__(self):
        for name, low in (("steps", 1), ("batch", 1), ("seqlen", 2), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"distill: {name} must be a whole number >= {low}, got {value!r}")
        for name, positive in (("lr", True), ("temperature", True), ("hidden_weight", False), ("weight_decay", False)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0 or (positive and value == 0):
                raise ValueError(f"distill: {name} must be a number {'>' if positive else '>='} 0, got {value!r}")
        if not isinstance(self.train_embeddings, bool):
            raise ValueError(f"distill: train_embeddings must be true or false, got {self.train_embeddings!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int | float) or not 0 <= self.warmup < 1:
            raise ValueError(f"distill: warmup must be a fraction in [0, 1), got {self.warmup!r}")

    @property
    def needs_calibration(self) -> bool:
        return True

    @property
    def needs_teacher(self) -> bool:
        return True

    def apply(self, lm, *, calibration=None, teacher=None, progress: bool | None = None) -> dict:
        if calibration is None:
            raise ValueError("distill: trains on calibration text (--calib FILE)")
        if teacher is None:
            raise ValueError("distill: needs the original model as teacher")
        return distill_(lm, teacher, self, calibration.text, progress=progress)


def _check(lm, teacher) -> None:
    from miaotui.arch import CAUSAL_LM
    from miaotui.quantize import PackedLinear

    if lm.kind != CAUSAL_LM:
        raise MiaotuiError(f"distill: learns next-token distributions, so it needs a causal LM, not a {lm.kind}")
    packed = [name for name, m in lm.model.named_modules() if isinstance(m, PackedLinear)]
    if packed:
        raise MiaotuiError(
            f"distill: {len(packed)} layers (e.g. {packed[0]}) are quantized and hold no trainable weights; "
            "put the distill step before the quantize step"
        )
    if teacher.config.vocab_size != lm.config.vocab_size:
        raise MiaotuiError("distill: the teacher and the student have different vocabularies")


def _losses(student, teacher, ids, cfg: DistillConfig, temperature: float):
    """(total loss, KL) for a batch of ids (B, T): KL(teacher || student) at `temperature`, times its square."""
    import torch
    import torch.nn.functional as F

    hidden = cfg.hidden_weight > 0
    with torch.no_grad():
        t_out = teacher.model(input_ids=ids.to(teacher.device), use_cache=False, output_hidden_states=hidden)
    s_out = student.model(input_ids=ids.to(student.device), use_cache=False, output_hidden_states=hidden)
    t_logp = F.log_softmax(t_out.logits.float().to(student.device) / temperature, dim=-1)  # (B, T, V)
    s_logp = F.log_softmax(s_out.logits.float() / temperature, dim=-1)  # (B, T, V)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean() * temperature**2
    loss = kl
    if hidden:
        t_h = t_out.hidden_states[-1].float().to(student.device)  # (B, T, H)
        loss = loss + cfg.hidden_weight * F.mse_loss(s_out.hidden_states[-1].float(), t_h) / t_h.square().mean()
    return loss, kl


def distill_(lm, teacher, cfg: DistillConfig, text: str, *, progress: bool | None = None) -> dict:
    """Distill `teacher` into `lm` in place on random windows of `text`; returns KL before/after and the losses.

    >>> distill_(student, teacher, DistillConfig(steps=100), calibration_text)["kl_after"]  # doctest: +SKIP
    """
    import torch

    from miaotui.calibration import calibration_windows
    from miaotui.progress import track

    _check(lm, teacher)
    n = cfg.steps * cfg.batch + EVAL_WINDOWS  # windows may overlap: training draws many from one text
    windows = calibration_windows(lm, text, n, cfg.seqlen, cfg.seed, overlap=True)  # (N, T)
    held_out, train = windows[:EVAL_WINDOWS], windows[EVAL_WINDOWS:]

    def held_out_kl() -> float:  # the plain KL (temperature 1), mean over tokens
        with torch.no_grad():
            kls = [_losses(lm, teacher, b, cfg, 1.0)[1].item() for b in held_out.split(cfg.batch)]
        return sum(kls) / len(kls)

    model = lm.model
    frozen = (
        set()
        if cfg.train_embeddings
        else {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    )
    floats = [p for p in model.parameters() if p.is_floating_point()]
    params = [p for p in floats if id(p) not in frozen]
    flags, dtypes = [p.requires_grad for p in floats], [p.dtype for p in floats]
    for p in floats:  # train in fp32 whatever the model's dtype (frozen tensors too), then cast back
        p.data = p.data.float()
        p.requires_grad_(id(p) not in frozen)
    lm.model.eval()  # no dropout: the student should match the teacher's deterministic outputs
    before = held_out_kl()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, round(cfg.warmup * cfg.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (cfg.steps - s) / max(1, cfg.steps - warm)))
    )
    losses = []
    try:
        for batch in track(list(train.split(cfg.batch)), "distilling", enabled=progress):
            loss, _ = _losses(lm, teacher, batch, cfg, cfg.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
    finally:
        opt.zero_grad(set_to_none=True)
        for p, flag, dtype in zip(floats, flags, dtypes, strict=True):
            p.requires_grad_(flag)
            p.data = p.data.to(dtype)
    tail = max(1, len(losses) // 10)
    return {
        "steps": cfg.steps,
        "tokens": train.numel(),
        "kl_before": before,
        "kl_after": held_out_kl(),
        "loss_first": sum(losses[:tail]) / tail,
        "loss_last": sum(losses[-tail:]) / tail,
    }
