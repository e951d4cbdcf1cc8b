"""A reference mixture of experts with real behaviour, built deterministically from ref-llama-16m.

Each block's MLP (1,024 neurons) is split into `experts` experts of equal size by balanced k-means on the
neurons' activation profiles over calibration text (neurons that fire together share an expert, so experts
differ); a router (a linear layer, as Mixtral's) is fitted by least squares to predict, from the block's normed
hidden state, how much each expert contributes to the MLP's output; each token runs its top `top_k` experts. The
attention, norms, embeddings and head are ref-llama-16m's own. Mixtral's layout (transformers, vLLM and
llama.cpp run it), bf16 like the dense model. Routing weights are kept near uniform (small router logits) and each
expert's output is scaled by `top_k`, so the routed experts add up as the dense MLP's neurons do.

    PYTHONPATH=. .venv/bin/python benchmarks/ref_moe.py OUT_FOLDER [--experts 8 --top-k 2]

>>> build_ref_moe("/tmp/ref-moe")  # doctest: +SKIP
PosixPath('/tmp/ref-moe')
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.nn.functional as F

DATA = Path(os.environ.get("MIAOTUI_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
WINDOWS, SEQLEN = 16, 512  # calibration text: 8,192 tokens of ref-llama-16m's training text
LOGIT_SCALE = 0.25  # router logits in units of the predicted contributions' spread: near-uniform weights


@torch.no_grad()
def _activations(model, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per block: (normed hidden state entering the MLP (T, H), the MLP's neuron activations (T, I))."""
    blocks = model.model.layers
    seen: dict[int, list] = {i: [[], []] for i in range(len(blocks))}
    hooks = []
    for i, block in enumerate(blocks):
        hooks.append(block.mlp.register_forward_pre_hook(lambda m, a, i=i: seen[i][0].append(a[0].flatten(0, 1))))
        hooks.append(
            block.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: seen[i][1].append(a[0].flatten(0, 1)))
        )
    try:
        for row in ids:
            model(input_ids=row[None])
    finally:
        for h in hooks:
            h.remove()
    return [(torch.cat(h), torch.cat(a)) for h, a in seen.values()]


def balanced_kmeans(x: torch.Tensor, clusters: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Cluster the rows of x (N, D) into `clusters` groups of N / clusters rows: (N,) cluster ids.

    >>> ids = balanced_kmeans(torch.randn(8, 3), 2)
    >>> torch.bincount(ids).tolist()
    [4, 4]
    """
    n = x.shape[0]
    size = n // clusters
    x = F.normalize(x, dim=1)
    gen = torch.Generator().manual_seed(seed)
    centers = x[torch.randperm(n, generator=gen)[:clusters]].clone()  # (C, D)
    ids = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        score = x @ centers.T  # (N, C) cosine
        ids = torch.full((n,), -1, dtype=torch.long)
        room = torch.full((clusters,), size)
        for flat in score.flatten().argsort(descending=True).tolist():  # best pairs first, capacity-bound
            row, c = divmod(flat, clusters)
            if ids[row] < 0 and room[c] > 0:
                ids[row], room[c] = c, room[c] - 1
        centers = F.normalize(torch.stack([x[ids == c].mean(0) for c in range(clusters)]), dim=1)
    return ids


def build_ref_moe(
    out: str | os.PathLike, *, experts: int = 8, top_k: int = 2, logit_scale: float = LOGIT_SCALE, seed: int = 0
) -> Path:
    """Write the reference MoE (module docstring) to `out`; returns its path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig, MixtralForCausalLM

    src = DATA / "ref-llama-16m"
    dense = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(src)
    text = (DATA / "ref-llama-16m-calibration.txt").read_text(encoding="utf-8")
    ids = torch.tensor(tok(text)["input_ids"])
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - SEQLEN, (WINDOWS,), generator=gen).tolist()
    windows = torch.stack([ids[s : s + SEQLEN] for s in starts])  # (W, T)
    c = dense.config
    inter = c.intermediate_size // experts
    config = MixtralConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=inter,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters=c.rope_parameters,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        tie_word_embeddings=False,
        architectures=["MixtralForCausalLM"],
    )
    moe = MixtralForCausalLM(config).eval()
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    missing = moe.load_state_dict(state, strict=False).missing_keys
    assert all(".mlp." in k for k in missing), missing
    for block, dense_block, (h, a) in zip(
        moe.model.layers, dense.model.layers, _activations(dense, windows), strict=True
    ):
        _split_mlp(block.mlp, dense_block.mlp, h, a, experts, top_k, logit_scale, seed)
    moe.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return Path(out)


@torch.no_grad()
def _split_mlp(
    moe_mlp, mlp, h: torch.Tensor, a: torch.Tensor, experts: int, top_k: int, scale: float, seed: int
) -> None:
    """Fill one MoE block from a dense MLP: neurons clustered by activation profile, router fitted on (h, a)."""
    profiles = a[torch.randperm(a.shape[0], generator=torch.Generator().manual_seed(seed))[:4096]].T  # (I, 4096)
    groups = balanced_kmeans(profiles.abs(), experts, seed=seed)  # (I,)
    down = mlp.down_proj.weight  # (H, I)
    contrib = torch.stack([(a[:, groups == e] @ down[:, groups == e].T).norm(dim=1) for e in range(experts)], 1)
    target = (contrib - contrib.mean(0)) / contrib.std(0)  # (T, E) standardized contributions
    gram = h.T @ h / len(h)  # (H, H)
    w = torch.linalg.solve(gram + 1e-3 * gram.diagonal().mean() * torch.eye(len(gram)), h.T @ target / len(h))
    moe_mlp.gate.weight.copy_(scale * w.T)  # (E, H): ridge least squares, no bias (as Mixtral's router)
    for e in range(experts):
        rows = (groups == e).nonzero().flatten()
        gate_up = torch.cat([mlp.gate_proj.weight[rows], mlp.up_proj.weight[rows]])  # (2 * I_e, H)
        moe_mlp.experts.gate_up_proj[e].copy_(gate_up)
        moe_mlp.experts.down_proj[e].copy_(top_k * down[:, rows])  # (H, I_e)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to write the model to")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--logit-scale", type=float, default=LOGIT_SCALE)
    a = parser.parse_args()
    print(build_ref_moe(a.out, experts=a.experts, top_k=a.top_k, logit_scale=a.logit_scale))


if __name__ == "__main__":
    main()
