"""Mixture-of-experts layers: find a model's experts, and turn their fused 3-D weights into one linear layer per
expert and projection, so that every technique (quantization, calibration, pruning, factorization) reaches them.

transformers keeps the experts of an MoE block as 3-D parameters, `gate_up_proj` (or `up_proj`) and `down_proj`,
of shape (experts, out, in) or transposed (experts, in, out), with optional biases, run by one of two contracts:
- routed: forward(hidden (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H), the contract of
  transformers' experts interface (Mixtral, Qwen-MoE, DeepSeek, OLMoE, gpt-oss, ...);
- dense: forward(hidden (E*T, H)) -> (E*T, H), rows e*T..(e+1)*T through expert e, already scaled by the
  routing weights (zero rows for tokens not routed there: Llama 4).
`ExpertLinears` holds the same weights as `nn.Linear` layers (`experts.{e}.gate_up_proj`, `experts.{e}.down_proj`)
and runs the same contract, with the original module's own gate function (e.g. gpt-oss's clamped SwiGLU on
interleaved channels). Which layout and contract a module follows is not assumed: each reading is checked against
the module's own forward on random inputs, and only one that reproduces it is used. Decoding a token runs only
its routed experts.

While calibrating (`observe_all_experts`), every expert also runs on every token of the block, so that its
statistics (GPTQ's Hessians, AWQ's and Wanda's activation norms) rest on all calibration tokens however
rarely the router picks it, while the block's output keeps the true routing.

>>> import torch
>>> from transformers import MixtralConfig
>>> from transformers.models.mixtral.modeling_mixtral import MixtralExperts
>>> config = MixtralConfig(hidden_size=16, intermediate_size=8, num_local_experts=4)
>>> fused = MixtralExperts(config)
>>> _ = [torch.nn.init.normal_(p) for p in fused.parameters()]
>>> x, idx, w = torch.randn(5, 16), torch.randint(0, 4, (5, 2)), torch.rand(5, 2)
>>> want = fused(x, idx, w)
>>> unfused = ExpertLinears.from_fused(fused)  # takes the module over: its 3-D weights are dropped
>>> torch.allclose(unfused(x, idx, w), want, atol=1e-4)
True
>>> unfused.experts[3].gate_up_proj
Linear(in_features=16, out_features=16, bias=False)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn

UP_NAMES = ("gate_up_proj", "up_proj")  # the first projection: gate and up fused, or up alone (no gate)
DOWN_NAME = "down_proj"
MIN_EXPERT_TOKENS = 128  # calibration of experts needs at least this many tokens (each expert sees them all)


def fused_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module holding experts as 3-D parameters (not yet unfused)."""
    found = []
    for name, mod in model.named_modules():
        params = [p for p in mod._parameters.values() if p is not None]
        if any(p.dim() == 3 for p in params) and not isinstance(mod, ExpertLinears):
            found.append((name, mod))
    return found


def expert_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every experts module, fused or unfused."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ExpertLinears)] + fused_experts(model)


def routing_layers(model: nn.Module) -> set[str]:
    """Names of the routers: the layers beside an experts module, in its parent, that hold a 2-D weight (the
    router's (experts, H), a shared expert's (1, H) gate). They stay in full precision."""
    names = set()
    for name, _ in expert_modules(model):
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        for child_name, child in parent.named_children():
            weight = getattr(child, "weight", None)
            if child_name != leaf and isinstance(weight, torch.Tensor) and weight.dim() == 2:
                names.add(f"{parent_name}.{child_name}" if parent_name else child_name)
    return names


class Expert(nn.Module):
    """One expert: `up` (gate and up fused, or up alone), the gate (or activation), `down`."""

    def __init__(self, up: nn.Module, down: nn.Module, up_name: str, gate: Callable):
        super().__init__()
        self.up_name = up_name
        setattr(self, up_name, up)
        self.down_proj = down
        self.gate = gate  # (.., up features) -> (.., inner features), e.g. act(gate) * up

    @property
    def up(self) -> nn.Module:
        return getattr(self, self.up_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate(self.up(x)))  # (n, H) -> (n, up) -> (n, inner) -> (n, H)


def _default_gate(act: Callable) -> Callable:
    def gate(y: torch.Tensor) -> torch.Tensor:
        g, u = y.chunk(2, dim=-1)
        return act(g) * u

    return gate


def _gate_of(origin: nn.Module | None, has_gate: bool) -> Callable:
    """The original module's own gate function, or act(gate) * up on [gate | up]; its activation without gate."""
    act = getattr(origin, "act_fn", None) or nn.SiLU()
    if not has_gate:
        return act
    return getattr(origin, "_apply_gate", None) or _default_gate(act)


def _strip(origin: nn.Module) -> nn.Module:
    """The original experts module without its weights: kept only for its gate function and activation."""
    for name in [n for n, p in origin._parameters.items() if p is not None and p.dim() >= 2]:
        del origin._parameters[name]
    for name in [n for n, p in origin._parameters.items() if p is not None]:
        del origin._parameters[name]  # biases
    return origin


class ExpertLinears(nn.Module):
    """Experts as linear layers: `experts[e].{gate_up_proj | up_proj}` (in -> up) and `experts[e].down_proj`
    (inner -> in), running the routed or the dense contract (module docstring). Built by `from_fused`; rebuilt
    from a checkpoint by `ExpertLinears(**describe())` and `adopt(original module)`.
    """

    structure_type = "expert_linears"

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        up_features: int,
        inner_features: int,
        *,
        has_gate: bool = True,
        bias: bool = False,
        routed: bool = True,
        dtype=torch.float32,
        device=None,
    ):
        super().__init__()
        self.num_experts, self.in_features = num_experts, in_features
        self.up_features, self.inner_features = up_features, inner_features
        self.has_gate, self.bias, self.routed = has_gate, bias, routed
        self.up_name = UP_NAMES[0] if has_gate else UP_NAMES[1]
        gate = _gate_of(None, has_gate)
        self.experts = nn.ModuleList(
            Expert(
                nn.Linear(in_features, up_features, bias=bias, dtype=dtype, device=device),
                nn.Linear(inner_features, in_features, bias=bias, dtype=dtype, device=device),
                self.up_name,
                gate,
            )
            for _ in range(num_experts)
        )
        self.observe_all = False  # calibration: every expert also runs every token (module docstring)
        self.routed_tokens: torch.Tensor | None = None  # (E,) counted while set (calibration reports)

    def describe(self) -> dict:
        return {
            "type": self.structure_type,
            "num_experts": self.num_experts,
            "in_features": self.in_features,
            "up_features": self.up_features,
            "inner_features": self.inner_features,
            "has_gate": self.has_gate,
            "bias": self.bias,
            "routed": self.routed,
        }

    def adopt(self, origin: nn.Module) -> ExpertLinears:
        """Run the gate function of `origin`, the original experts module (its weights dropped)."""
        gate = _gate_of(_strip(origin), self.has_gate)
        object.__setattr__(self, "origin", origin)  # not a submodule: it holds no tensors any more
        for expert in self.experts:
            expert.gate = gate
        return self

    @classmethod
    def from_fused(cls, module: nn.Module) -> ExpertLinears:
        """The linear-layer version of a fused experts module, checked to compute what it computes. The module
        itself loses its weights (it is kept, unregistered, for its gate function): replace it by the result.

        Raises ValueError when no reading of its weights reproduces its forward (its weights then stay fused).
        """
        reading = _reading_of(module)
        if reading is None:
            raise ValueError(
                f"{type(module).__name__}: no reading of its 3-D weights (routed or dense experts, either "
                "layout) reproduces its forward"
            )
        new = _build(module, *reading)
        new.adopt(module)
        return new

    def forward(self, hidden: torch.Tensor, *routing: torch.Tensor) -> torch.Tensor:
        return _run(self, hidden, *routing)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, routed={self.routed}, has_gate={self.has_gate}"


@torch.compiler.disable  # data-dependent expert choice: runs eagerly inside compiled steps
def _run(self: ExpertLinears, hidden: torch.Tensor, *routing: torch.Tensor) -> torch.Tensor:
    if self.routed:
        return _routed(self, hidden, *routing)
    return _dense(self, hidden)


def _routed(self: ExpertLinears, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """hidden (T, H), index (T, k) expert ids (ids >= E: no expert), weights (T, k) -> (T, H)."""
    out = torch.zeros_like(hidden)  # (T, H)
    if hidden.shape[0] == 1 and not self.observe_all and self.routed_tokens is None:  # decoding: k experts
        for slot, e in sorted(enumerate(index[0].tolist()), key=lambda p: p[1]):  # summed in expert order
            if e < self.num_experts:
                out += (self.experts[e](hidden) * weights[:, slot, None]).to(out.dtype)
        return out
    flat = index.reshape(-1)
    counts = torch.bincount(flat[flat < self.num_experts], minlength=self.num_experts)  # (E,)
    if self.routed_tokens is not None:
        self.routed_tokens += counts.cpu()
    hit = range(self.num_experts) if self.observe_all else counts.nonzero().flatten().tolist()
    for e in hit:
        tok, slot = torch.where(index == e)  # (n,), (n,)
        y = self.experts[e](hidden)[tok] if self.observe_all else self.experts[e](hidden[tok])  # (n, H)
        out.index_add_(0, tok, (y * weights[tok, slot, None]).to(out.dtype))
    return out


def _dense(self: ExpertLinears, hidden: torch.Tensor) -> torch.Tensor:
    """hidden (E*T, H), zero rows for tokens not routed to that expert -> (E*T, H). Without biases a zero row
    gives a zero output, so only the routed rows are computed."""
    x = hidden.view(self.num_experts, -1, hidden.shape[-1])  # (E, T, H)
    out = torch.zeros_like(x)
    for e in range(self.num_experts):
        rows = torch.arange(x.shape[1], device=x.device)
        if not self.bias:
            rows = (x[e].abs().amax(-1) > 0).nonzero().flatten()  # (n,)
        if self.routed_tokens is not None:
            self.routed_tokens[e] += len(rows)
        if len(rows):
            out[e, rows] = self.experts[e](x[e, rows]).to(out.dtype)
    return out.view(-1, hidden.shape[-1])


def _weights(module: nn.Module) -> tuple[str, torch.Tensor, torch.Tensor]:
    up_name = next((n for n in UP_NAMES if isinstance(getattr(module, n, None), torch.Tensor)), None)
    down = getattr(module, DOWN_NAME, None)
    if up_name is None or not isinstance(down, torch.Tensor) or down.dim() != 3:
        raise ValueError(f"{type(module).__name__} has no 3-D {' or '.join(UP_NAMES)} and {DOWN_NAME} weights")
    return up_name, getattr(module, up_name), down


def _build(module: nn.Module, transposed: bool, routed: bool, experts: int | None = None) -> ExpertLinears:
    """ExpertLinears holding copies of `module`'s weights read as (E, out, in), or (E, in, out) if transposed;
    only the first `experts` experts when given (to check a reading cheaply)."""
    up_name, up, down = _weights(module)
    up_t, down_t = (up.transpose(1, 2), down.transpose(1, 2)) if transposed else (up, down)  # (E, out, in)
    n = experts or up.shape[0]
    up_bias = getattr(module, f"{up_name}_bias", None)
    down_bias = getattr(module, f"{DOWN_NAME}_bias", None)
    new = ExpertLinears(
        n,
        up_t.shape[2],
        up_t.shape[1],
        down_t.shape[2],
        has_gate=up_name == UP_NAMES[0],
        bias=isinstance(up_bias, torch.Tensor),
        routed=routed,
        dtype=up.dtype,
        device=up.device,
    )
    with torch.no_grad():
        for e, expert in enumerate(new.experts):
            expert.up.weight.copy_(up_t[e])
            expert.down_proj.weight.copy_(down_t[e])
            if new.bias:
                expert.up.bias.copy_(up_bias[e])
                expert.down_proj.bias.copy_(down_bias[e])
    for expert in new.experts:
        expert.gate = _gate_of(module, new.has_gate)
    return new


def _candidates(module: nn.Module) -> Iterator[tuple[bool, bool]]:
    """(transposed, routed) readings to try, the module's own declaration first."""
    declared = getattr(module, "is_transposed", None)
    for transposed in ([declared] if isinstance(declared, bool) else []) + [False, True]:
        for routed in (True, False):
            yield transposed, routed


@torch.no_grad()
def _reading_of(module: nn.Module) -> tuple[bool, bool] | None:
    """The first (transposed, routed) reading whose linear layers reproduce `module`'s forward on random inputs."""
    _, up, down = _weights(module)
    total, experts, dtype, device = up.shape[0], min(2, up.shape[0]), up.dtype, up.device
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for transposed, routed in _candidates(module):
        hidden = up.shape[1] if transposed else up.shape[2]
        if hidden != (down.shape[2] if transposed else down.shape[1]):
            continue
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(experts, 4, hidden, generator=gen).to(dtype=dtype, device=device)  # (2, 4, H)
        if routed:  # 8 tokens, each routed to experts 0 and 1 with weights 0.75 and 0.25
            index = torch.tensor([[0, 1]] * 8, device=device)[:, :experts]
            args = (x.view(-1, hidden), index, torch.tensor([0.75, 0.25], device=device)[:experts].expand(8, -1))
            probe = args
        else:  # 4 rows for each of the first two experts, zero rows for the others
            rest = torch.zeros(total - experts, 4, hidden, dtype=dtype, device=device)
            args, probe = (torch.cat([x, rest]).view(-1, hidden),), (x.view(-1, hidden),)
        try:
            want = module(*args)
            got = _build(module, transposed, routed, experts)(*probe)
        except (RuntimeError, TypeError, ValueError, IndexError):
            continue
        want = (want[0] if isinstance(want, tuple) else want)[: got.shape[0]]
        if got.shape == want.shape and _close(got, want, tol):
            return transposed, routed
    return None


def _close(got: torch.Tensor, want: torch.Tensor, tol: float) -> bool:
    err = (got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-12)
    return bool(err < tol)


def unfuse_experts_(model: nn.Module) -> tuple[dict, dict[str, str]]:
    """Replace every fused experts module by its ExpertLinears, in place (idempotent).

    Returns (summary entries: {"experts_unfused": modules} when there were any, {module name: why it stays
    fused}): a module whose forward no reading reproduces keeps its 3-D weights in full precision, and every
    compression step reports it under "skipped".
    """
    unfused, kept = 0, {}
    for name, module in fused_experts(model):
        try:
            new = ExpertLinears.from_fused(module)
        except ValueError as e:
            kept[name] = f"experts kept fused, in full precision: {e}"
            continue
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)
        unfused += 1
    return ({"experts_unfused": unfused} if unfused else {}), kept


@contextlib.contextmanager
def observe_all_experts(module: nn.Module) -> Iterator[None]:
    """While inside, every expert of `module` also runs on every token (calibration statistics)."""
    layers = [m for m in module.modules() if isinstance(m, ExpertLinears)]
    for m in layers:
        m.observe_all = True
    try:
        yield
    finally:
        for m in layers:
            m.observe_all = False


@contextlib.contextmanager
def count_routed_tokens(module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Count the tokens routed to each expert of `module` while inside: yields {name: (E,) counts}."""
    layers = {n: m for n, m in module.named_modules() if isinstance(m, ExpertLinears)}
    counts = {}
    for n, m in layers.items():
        m.routed_tokens = counts[n] = torch.zeros(m.num_experts, dtype=torch.long)
    try:
        yield counts
    finally:
        for m in layers.values():
            m.routed_tokens = None


@torch.no_grad()
def experts_per_token(model: nn.Module, tokens: int = 8) -> float | None:
    """How many experts a token runs through, per experts module, seen on a few random tokens (None: no experts).

    The routed contract says it in its index tensor (T, k); the dense one in the rows that are not zero.
    """
    modules = [m for _, m in expert_modules(model)]
    if not modules:
        return None
    seen: list[float] = []

    def hook(module, args):
        if len(args) >= 2:  # routed: (hidden, top_k_index, top_k_weights)
            seen.append(float(args[1].shape[-1]))
        else:  # dense: (E*T, H), rows of tokens not routed to an expert are zero
            e = getattr(module, "num_experts", None) or args[0].shape[0] // tokens
            rows = args[0].reshape(e, -1, args[0].shape[-1]).abs().amax(-1) > 0  # (E, T)
            seen.append(rows.sum(0).float().mean().item())

    handles = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        vocab = model.get_input_embeddings().num_embeddings
        ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids.to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return sum(seen) / len(seen) if seen else None


def num_experts(module: nn.Module) -> int:
    """The number of experts of an experts module (fused or not)."""
    if isinstance(module, ExpertLinears):
        return module.num_experts
    return next(p.shape[0] for p in module.parameters() if p.dim() == 3)


def expert_shapes(module: nn.Module) -> list[tuple[int, int]]:
    """(out, in) of one expert's projections (up, then down) in an experts module, fused or not."""
    if isinstance(module, ExpertLinears):
        return [(module.up_features, module.in_features), (module.in_features, module.inner_features)]
    shapes = [tuple(p.shape[1:]) for p in module.parameters() if p.dim() == 3]
    transposed = getattr(module, "is_transposed", False)
    return [(b, a) if transposed else (a, b) for a, b in shapes]
