"""The MoE layer against per-token loops and hand-computed numbers: routing weights, expert outputs,
the load-balancing loss and how the trainer adds it, and the router gradient of GPT-MoE top-1 routing."""

import pytest
import torch
import torch.nn.functional as F

from effdl.core.config import ModelConfig
from effdl.core.moe import MoEFeedForward, balance_loss, expert_outputs, route_top_k, swiglu_expert
from effdl.core.transformer import Transformer
from effdl.train.lm import lm_loss


def test_route_top_k_weights():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0], [0.0, 3.0, 3.5, 0.5]])
    weights, experts = route_top_k(logits, 2, normalize=True)
    assert experts.tolist() == [[0, 2], [2, 1]]
    # Renormalised: a softmax over the two selected logits alone.
    want = torch.tensor([[1 / (1 + torch.e**-1), 1 / (1 + torch.e)], [1 / (1 + torch.e**-0.5), 1 / (1 + torch.e**0.5)]])
    torch.testing.assert_close(weights, want)

    weights, experts = route_top_k(logits, 2, normalize=False)
    assert experts.tolist() == [[0, 2], [2, 1]]
    exp = logits.exp()
    torch.testing.assert_close(weights, torch.gather(exp / exp.sum(-1, keepdim=True), 1, experts))

    weights, experts = route_top_k(logits, 1, normalize=False)
    assert experts.tolist() == [[0], [2]]
    torch.testing.assert_close(weights[:, 0], torch.tensor([exp[0, 0] / exp[0].sum(), exp[1, 2] / exp[1].sum()]))
    assert (weights < 1).all()
    assert route_top_k(logits, 1, normalize=True)[0].tolist() == [[1.0], [1.0]]

    weights, _ = route_top_k(logits.bfloat16(), 2)
    assert weights.dtype == torch.float32  # routing maths in fp32 whatever the activations


def _naive_moe(moe: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Token by token: softmax over all experts, the k best, optionally renormalised, SwiGLU written out."""
    out = torch.zeros_like(x)
    for n, token in enumerate(x):
        probs = F.softmax(moe.gate.weight @ token, dim=-1)
        order = sorted(range(moe.n_experts), key=lambda e: -probs[e].item())[: moe.k]
        total = sum(probs[e] for e in order)
        for e in order:
            w1, w3 = moe.w13[e].chunk(2)  # (F, D) each
            hidden = F.silu(w1 @ token) * (w3 @ token)  # (F,)
            out[n] += (probs[e] / total if moe.normalize else probs[e]) * (moe.w2[e] @ hidden)
    return out


@pytest.mark.parametrize(("k", "normalize"), [(1, False), (2, True), (2, False), (3, True)])
def test_moe_forward_equals_per_token_loop(k, normalize):
    moe = MoEFeedForward(dim=16, ffn_dim=24, n_experts=5, experts_per_token=k, normalize=normalize).eval()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), _naive_moe(moe, x.view(-1, 16)).view(3, 7, 16), atol=1e-5, rtol=1e-5)
    assert moe.balance_loss is None  # eval mode keeps no loss


def test_expert_outputs_and_swiglu_expert_against_loop():
    gen = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(4, 10, 6, generator=gen), torch.randn(4, 6, 5, generator=gen)  # E=4, F=5, D=6
    x = torch.randn(9, 6, generator=gen)
    experts = torch.tensor([3, 0, 3, 1, 3, 0, 1, 1, 3])  # expert 2 gets no rows
    out = expert_outputs(x, experts, w13, w2)
    for r in range(9):
        e = int(experts[r])
        w1, w3 = w13[e].chunk(2)
        torch.testing.assert_close(out[r], w2[e] @ (F.silu(w1 @ x[r]) * (w3 @ x[r])))
        torch.testing.assert_close(swiglu_expert(x[r : r + 1], w13[e], w2[e])[0], out[r])


def test_balance_loss_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.6, 0.4], [0.2, 0.8]])  # mean P = (0.6, 0.4)
    logits = probs.log()
    top1 = torch.tensor([[0], [0], [0], [1]])  # f = (3/4, 1/4)
    assert balance_loss(logits, top1).item() == pytest.approx(2 * (0.75 * 0.6 + 0.25 * 0.4))  # 1.1
    both = torch.tensor([[0, 1]] * 4)  # f = (1/2, 1/2)
    assert balance_loss(logits, both).item() == pytest.approx(2 * (0.5 * 0.6 + 0.5 * 0.4))
    # Perfectly uniform: equal router probabilities and every expert chosen equally often.
    uniform = balance_loss(torch.zeros(8, 4), (torch.arange(16) % 4).view(8, 2))
    assert uniform.item() == pytest.approx(1.0)


def _model(**overrides) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("gpt-moe-8e", n_layers=2, **overrides))
    model.reset_parameters(std=0.1)
    return model


def _batch():
    tokens = torch.randint(0, 258, (2, 13), generator=torch.Generator().manual_seed(1))
    return tokens[:, :-1], tokens[:, 1:]


def _hand_balance(router_logits: list[torch.Tensor], k: int) -> torch.Tensor:
    """Mean over layers of E * sum_e f_e P_e, from each layer's router logits (N, E)."""
    losses = []
    for logits in router_logits:
        n_experts = logits.shape[-1]
        probs = logits.softmax(-1)
        chosen = probs.topk(k, dim=-1).indices
        share = torch.stack([(chosen == e).sum() for e in range(n_experts)]) / chosen.numel()
        losses.append(n_experts * (share * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def test_lm_loss_adds_balance_loss_in_training_only():
    model = _model()
    inputs, targets = _batch()
    router_logits = []
    for block in model.layers:
        block.feed_forward.gate.register_forward_hook(lambda _m, _i, out: router_logits.append(out.detach()))

    model.train()
    loss = lm_loss(model, inputs, targets)
    balance = _hand_balance(router_logits, k=1)
    torch.testing.assert_close(model.balance_loss().detach(), balance)
    with torch.no_grad():
        ce = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
    assert model.config.router_aux_coef == 0.05
    torch.testing.assert_close(loss.detach(), ce + 0.05 * balance)

    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(lm_loss(model, inputs, targets), ce)
    assert model.balance_loss().item() == 0.0  # the eval forward left no loss behind


@pytest.mark.parametrize("normalize", [False, True])
def test_top1_router_learns_only_without_renormalisation(normalize):
    """With k=1, renormalised weights are exactly 1: the LM loss cannot reach the router (hence norm_topk_prob)."""
    model = _model(norm_topk_prob=normalize, router_aux_coef=0.0).train()
    lm_loss(model, *_batch()).backward()
    for block in model.layers:
        grad = block.feed_forward.gate.weight.grad.abs().max().item()
        assert grad < 1e-6 if normalize else grad > 1e-3


def test_hf_config_round_trip_keeps_routing_fields():
    cfg = ModelConfig.preset("gpt-moe-16e-top2", router_aux_coef=0.125)
    hf = cfg.to_hf()
    assert (hf["norm_topk_prob"], hf["router_aux_loss_coef"], hf["num_experts_per_tok"]) == (False, 0.125, 2)
    back = ModelConfig.from_hf(hf)
    assert (back.norm_topk_prob, back.router_aux_coef, back.experts_per_token, back.n_experts) == (False, 0.125, 2, 16)
    assert back == cfg
    default = ModelConfig.from_hf({k: v for k, v in hf.items() if k not in ("norm_topk_prob", "router_aux_loss_coef")})
    assert (default.norm_topk_prob, default.router_aux_coef) == (True, 0.01)  # Mixtral's defaults
