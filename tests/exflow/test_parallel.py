"""Expert-parallel generation against the single-process model with the same weights.

Greedy tokens and logits must equal full forward passes of ``Transformer``; every collective and every
token row sent is checked against counts derived by hand, or by following each token's copies through the
routing the single-process model chooses (a naive loop over requests, positions and layers); the bytes
counted, against what ``all_to_all_single`` itself was handed.
"""

import functools

import numpy as np
import pytest
import torch
import torch.distributed as dist

from effdl.core.config import ModelConfig
from effdl.core.transformer import Transformer
from effdl.distributed import spawn
from effdl.errors import EffdlError
from effdl.exflow.affinity import transition_counts
from effdl.exflow.parallel import MODES, PHASES, CommStats, ExpertParallel, _Comm
from effdl.exflow.placement import Placement, solve
from effdl.exflow.trace import model_fingerprint

TOP1, TOP2 = "gpt-moe-8e", "gpt-moe-16e-top2"
# Five requests of different lengths: with 4 ranks rank 0 homes two of them (0 and 4).
PROMPT_LENS = (7, 3, 12, 1, 9)
PROMPTS = [torch.randint(0, 258, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in PROMPT_LENS]
NEW = 5  # new tokens per request: the prefill's token, then NEW - 1 decode steps
STEPS = NEW - 1


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls gain nothing from threads, and threads waiting on a busy CPU cost 100x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(name: str) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(name))
    model.reset_parameters(std=0.1)  # wider than the default so greedy logits are far from ties
    return model.eval()


@torch.no_grad()
def _routing(model: Transformer, seq: list[int]) -> np.ndarray:
    """Experts (L, T, k) the single-process model routes each token of ``seq`` to, best first."""
    router_logits = []
    handles = [
        block.feed_forward.gate.register_forward_hook(lambda _m, _i, out: router_logits.append(out))
        for block in model.layers
    ]
    try:
        model(torch.tensor([seq]))
    finally:
        for handle in handles:
            handle.remove()
    k = model.config.experts_per_token
    return torch.stack([logits.topk(k, dim=-1).indices for logits in router_logits]).numpy()  # (L, T, k)


@functools.cache
def _reference(name: str) -> tuple[list[list[int]], np.ndarray, list[np.ndarray]]:
    """Greedy tokens (B, NEW) by a full forward per token, logits (NEW, B, V), and each request's routing
    (L, T, k) over its prompt and every generated token that is fed back (all but the last)."""
    model = _model(name)
    tokens, logits, routes = [], [], []
    with torch.no_grad():
        for prompt in PROMPTS:
            seq, steps = list(prompt), []
            for _ in range(NEW):
                out = model(torch.tensor([seq]))[0, -1]  # (V,)
                steps.append(out)
                seq.append(int(out.argmax()))
            tokens.append(seq[len(prompt) :])
            logits.append(torch.stack(steps))  # (NEW, V)
            routes.append(_routing(model, seq[:-1]))
    return tokens, torch.stack(logits, dim=1).numpy(), routes


def _expected_rows(name: str, mode: str, gpu_of: np.ndarray, world: int, n_requests: int) -> tuple[dict, dict]:
    """rows_cross and rows_total per phase and layer, following every copy of every token.

    Prefill (both modes) and standard decode: each of a token's k copies goes from its home rank b % G to
    its expert's rank and back. Coherent decode: the copies go from wherever the token is to their experts'
    ranks, the secondary copies then join the primary's rank, and the token stays there.
    """
    n_layers = gpu_of.shape[0]
    cross = {phase: [0] * n_layers for phase in PHASES}
    total = {phase: [0] * n_layers for phase in PHASES}
    for b, route in enumerate(_reference(name)[2][:n_requests]):
        home = at = b % world
        for t in range(route.shape[1]):
            phase = "prefill" if t < len(PROMPTS[b]) else "decode"
            for layer in range(n_layers):
                ranks = [int(gpu_of[layer, e]) for e in route[layer, t]]
                if mode == "standard" or phase == "prefill":
                    for r in ranks:
                        cross[phase][layer] += 2 * (r != home)
                        total[phase][layer] += 2
                else:
                    for r in ranks:
                        cross[phase][layer] += r != at
                        total[phase][layer] += 1
                    for r in ranks[1:]:
                        cross[phase][layer] += r != ranks[0]
                        total[phase][layer] += 1
                    at = ranks[0]
    return cross, total


def _round_robin(name: str, world: int) -> np.ndarray:
    cfg = ModelConfig.preset(name)
    return np.tile(np.arange(cfg.n_experts) % world, (cfg.n_layers, 1))


@functools.cache  # one object per case: the ranks and the checks see the same placement
def _placement(name: str, kind: str | None, world: int) -> Placement | None:
    """None (round robin); "random": balanced at random; "solved": staged, on the reference's own routing."""
    cfg = ModelConfig.preset(name)
    if kind == "random":
        rng = np.random.default_rng(world)
        gpu_of = np.stack([rng.permutation(np.arange(cfg.n_experts) % world) for _ in range(cfg.n_layers)])
        return Placement(gpu_of, world, "staged", 0.0)
    if kind == "solved":
        experts = np.concatenate([r.transpose(1, 0, 2) for r in _reference(name)[2]])  # (N, L, k)
        return solve(transition_counts(experts, cfg.n_experts), world, "staged", model=model_fingerprint(cfg))
    return None


# How dispatches learn their sizes: the default padding limit (every message here is tiny: fixed slots, no
# size exchange); 0 (every dispatch exchanges row counts first); or a limit between the decode messages and
# the prefill's, as in real runs (prefill exchanges sizes, decode is padded).
VARIANTS = ("padded", "exact", "mixed")


def _pad_limit(variant: str, cfg: ModelConfig, world: int) -> dict:
    if variant == "padded":
        return {}
    if variant == "exact":
        return {"pad_limit_bytes": 0}
    # A decode message holds a short header and at most B k rows per peer of fewer than D + 8 floats; a
    # prefill one, more rows (of D + 1 floats).
    home_tokens = max(sum(PROMPT_LENS[r::world]) for r in range(world))
    assert home_tokens * (cfg.dim + 1) > len(PROMPTS) * (cfg.dim + 8)
    return {"pad_limit_bytes": 4 * world * len(PROMPTS) * cfg.experts_per_token * (cfg.dim + 8)}


def _record_all_to_alls(calls: list[tuple[int, int]]) -> None:
    """Make ``dist.all_to_all_single`` note, per call, the bytes it is handed: in all, and for other ranks."""
    original = dist.all_to_all_single

    def recording(output, input, output_split_sizes=None, input_split_sizes=None, **kwargs):
        n = input.shape[0]
        own = n // dist.get_world_size() if input_split_sizes is None else input_split_sizes[dist.get_rank()]
        total = input.numel() * input.element_size()
        calls.append((total, total * own // n if n else 0))
        return original(output, input, output_split_sizes, input_split_sizes, **kwargs)

    dist.all_to_all_single = recording


def _rank_generate(rank: int, cases: list[tuple[str, str, Placement | None, str, int]]):
    torch.set_num_threads(1)  # as in _one_thread
    calls: list[tuple[int, int]] = []
    _record_all_to_alls(calls)
    results = []
    for name, mode, placement, variant, n_requests in cases:
        limit = _pad_limit(variant, ModelConfig.preset(name), dist.get_world_size())
        calls.clear()
        gen = ExpertParallel(_model(name), mode, placement, **limit).generate(
            PROMPTS[:n_requests], NEW, return_logits=True
        )
        results.append((gen.tokens, gen.logits.numpy(), gen.stats, list(calls)))
    return results


def _bytes_by_layer(ranks: list, n_layers: int) -> tuple[dict, dict]:
    """Every rank's recorded all-to-alls, (bytes in all, bytes for others), summed per phase and layer.

    Calls are assigned in the order ``generate`` issues them: the prefill's layers in turn, then each decode
    step's layers in turn, each layer issuing its data all-to-alls and size exchanges (checked by hand in
    ``_check``) back to back.
    """
    stats = ranks[0][2]
    steps = {"prefill": 1, "decode": STEPS}
    total = {phase: [0] * n_layers for phase in PHASES}
    cross = {phase: [0] * n_layers for phase in PHASES}
    for *_, calls in ranks:
        it = iter(calls)
        for phase in PHASES:
            per_layer = [(a + s) // steps[phase]
                         for a, s in zip(stats.all_to_all[phase], stats.size_exchanges[phase], strict=True)]
            for _ in range(steps[phase]):
                for layer, n_calls in enumerate(per_layer):
                    for all_bytes, own_bytes in (next(it) for _ in range(n_calls)):
                        total[phase][layer] += all_bytes
                        cross[phase][layer] += all_bytes - own_bytes
        assert next(it, None) is None  # no all-to-all outside the MoE layers
    return total, cross


_RUNS: dict = {}


def _run(world: int, cases: tuple) -> list:
    """All ``cases`` (preset, mode, placement kind, variant, requests) in one spawn of ``world`` ranks: per
    case, every rank's (tokens, logits, stats). Kept, failure included, so a broken run is spawned once."""
    key = (world, cases)
    if key not in _RUNS:
        args = [(name, mode, _placement(name, kind, world), variant, n) for name, mode, kind, variant, n in cases]
        try:
            per_rank = spawn(_rank_generate, world, args, timeout_s=300)
            _RUNS[key] = [[ranks[i] for ranks in per_rank] for i in range(len(cases))]
        except Exception as e:
            _RUNS[key] = e
    if isinstance(_RUNS[key], Exception):
        raise _RUNS[key]
    return _RUNS[key]


def _check(ranks: list, world: int, name: str, mode: str, kind: str | None, variant: str, n_requests: int) -> None:
    """Every rank's tokens and logits against the reference; the summed stats against hand and loop counts."""
    cfg = ModelConfig.preset(name)
    k, n_layers, B = cfg.experts_per_token, cfg.n_layers, n_requests
    want_tokens, want_logits, _ = _reference(name)
    for tokens, logits, *_ in ranks:  # every rank returns every request
        assert tokens == want_tokens[:B]
        assert logits.shape == (NEW, B, cfg.vocab_size)
        np.testing.assert_allclose(logits, want_logits[:, :B], atol=1e-4, rtol=0)

    stats = ranks[0][2]
    coherent = mode == "coherent"
    # Collectives per MoE layer, summed over the decode steps: coherent top-1 sends once, standard dispatches
    # and combines, coherent top-2 dispatches and sends the secondary outputs to the primary's rank.
    data = 1 if coherent and k == 1 else 2
    assert stats.all_to_all == {"prefill": [2] * n_layers, "decode": [data * STEPS] * n_layers}
    # One row-count exchange per dispatch that is not padded (a combine's sizes are known from its dispatch).
    dispatches = 2 if coherent and k > 1 else 1
    exchanges = {"padded": (0, 0), "exact": (1, dispatches * STEPS), "mixed": (1, 0)}[variant]
    assert stats.size_exchanges == {"prefill": [exchanges[0]] * n_layers, "decode": [exchanges[1]] * n_layers}
    assert stats.kv_syncs == {"prefill": int(coherent), "decode": STEPS if coherent else 0}

    # Rows by hand: the prefill sends k copies of every prompt token there and back; a standard decode step
    # 2 B k rows; a coherent one B k rows out and B (k - 1) secondary rows to the primary.
    decode_rows = (B * k + B * (k - 1) if coherent else 2 * B * k) * STEPS
    prefill_rows = 2 * k * sum(PROMPT_LENS[:B])
    assert stats.rows_total == {"prefill": [prefill_rows] * n_layers, "decode": [decode_rows] * n_layers}
    placement = _placement(name, kind, world)
    gpu_of = _round_robin(name, world) if placement is None else placement.gpu_of
    if kind is not None:
        assert (gpu_of != _round_robin(name, world)).any()  # the placement really differs from the default
    cross, total = _expected_rows(name, mode, gpu_of, world, B)
    assert stats.rows_total == total
    assert stats.rows_cross == cross
    if world == 1:
        assert stats.rows_cross == {phase: [0] * n_layers for phase in PHASES}

    # Bytes: what the collective was handed, padding, headers and size exchanges included.
    want_total, want_cross = _bytes_by_layer(ranks, n_layers)
    assert stats.bytes_total == want_total
    assert stats.bytes_cross == want_cross
    assert all(b > 0 for phase in PHASES for b in stats.bytes_total[phase])

    # Context syncs, all ranks together: coherent all-reduces the prompts' KV cache (fp32) once, then per
    # decode step every layer's new K/V rows and the sampled token of every request.
    kv_row = n_layers * 2 * cfg.n_kv_heads * cfg.head_dim  # K and V of every layer, one position
    max_len = max(PROMPT_LENS[:B]) + NEW
    want_bytes = {"prefill": world * B * kv_row * max_len * 4, "decode": world * STEPS * B * (kv_row + 1) * 4}
    assert stats.kv_sync_bytes == (want_bytes if coherent else dict.fromkeys(PHASES, 0))


CASES = {  # world size -> (preset, mode, placement kind: None is round robin)
    1: [(TOP1, "coherent", None), (TOP2, "coherent", None), (TOP2, "standard", None)],
    2: [
        (TOP1, "standard", None),
        (TOP1, "coherent", None),
        (TOP2, "standard", None),
        (TOP2, "coherent", None),
        (TOP1, "coherent", "solved"),
        (TOP2, "coherent", "random"),
        (TOP2, "standard", "random"),
    ],
    4: [
        (TOP1, "standard", None),
        (TOP1, "coherent", None),
        (TOP2, "standard", None),
        (TOP2, "coherent", None),
        (TOP2, "coherent", "random"),
    ],
}
ALL_REQUESTS = {
    world: tuple((*case, variant, len(PROMPTS)) for case in cases for variant in VARIANTS)
    for world, cases in CASES.items()
}


@pytest.mark.parametrize(
    ("world", "index"),
    [(world, i) for world, cases in ALL_REQUESTS.items() for i in range(len(cases))],
    ids=[f"{w}ranks-{n}-{m}-{p or 'round_robin'}-{v}" for w, cases in ALL_REQUESTS.items() for n, m, p, v, _ in cases],
)
def test_generation_and_traffic_equal_single_process(world, index):
    cases = ALL_REQUESTS[world]
    _check(_run(world, cases)[index], world, *cases[index])


FEW_REQUESTS = ((TOP1, "coherent", None, "padded", 2), (TOP2, "standard", None, "padded", 2),
                (TOP2, "coherent", "random", "exact", 2))  # fmt: skip


@pytest.mark.parametrize("index", range(len(FEW_REQUESTS)), ids=[f"{n}-{m}" for n, m, *_ in FEW_REQUESTS])
def test_ranks_without_requests(index):
    """Two requests on four ranks: ranks 2 and 3 home none (their tokens may still visit their experts)."""
    _check(_run(4, FEW_REQUESTS)[index], 4, *FEW_REQUESTS[index])


@pytest.mark.parametrize("mode", ["standard", "coherent"])
def test_single_process_without_process_group(mode):
    """No process group (world size 1, as ``effdl exflow run`` without torchrun): the same greedy tokens."""
    want_tokens, want_logits, _ = _reference(TOP2)
    gen = ExpertParallel(_model(TOP2), mode).generate(PROMPTS, NEW, return_logits=True)
    assert gen.tokens == want_tokens
    np.testing.assert_allclose(gen.logits.numpy(), want_logits, atol=1e-4, rtol=0)
    assert gen.stats.rows_cross == {phase: [0] * 6 for phase in PHASES}


def test_comm_counts_under_the_phase_and_layer_it_is_scoped_to():
    """``_Comm.at`` scopes the exchanges to a phase and layer without changing the comm it came from."""
    stats = CommStats.empty(3)
    comm = _Comm(stats, rank=0, world=1, pad_limit_bytes=1 << 20)
    rows = torch.arange(8.0).view(4, 2)  # (n, P)
    scoped = comm.at("decode", 2)
    received, route = scoped.dispatch(rows, torch.zeros(4, dtype=torch.long), torch.tensor([[4]]))
    torch.testing.assert_close(scoped.reply(received, route), rows)
    assert (comm.phase, comm.layer) == ("prefill", 0)
    assert stats.all_to_all == {"prefill": [0, 0, 0], "decode": [0, 0, 2]}
    assert stats.rows_total["decode"] == [0, 0, 8] and stats.rows_cross["decode"] == [0, 0, 0]
    with pytest.raises(AttributeError):
        comm.layer = 1


def test_bad_input():
    """Checked before any collective, so a single process without a process group sees the errors."""
    with pytest.raises(EffdlError, match="unknown mode 'fast'; modes: standard, coherent"):
        ExpertParallel(_model(TOP1), "fast")
    with pytest.raises(EffdlError, match=r"needs a mixture-of-experts model \(n_experts > 0\)"):
        ExpertParallel(Transformer(ModelConfig.preset("tiny", n_layers=1)))
    other = Placement(np.zeros((4, 8), dtype=np.int64), 1, "round_robin", 0.0)  # moe-tiny: 4 layers x 8 experts
    with pytest.raises(EffdlError, match="placement is for 4 layers x 8 experts but the model has 6 x 8"):
        ExpertParallel(_model(TOP1), placement=other)
    stale = Placement(np.zeros((6, 8), dtype=np.int64), 1, "staged", 0.0, model="mixtral layers=6 experts=8 top2")
    with pytest.raises(
        EffdlError,
        match=r"solved for another model \(mixtral layers=6 experts=8 top2\); this one is "
        r"mixtral layers=6 experts=8 top1 dim=128",
    ):
        ExpertParallel(_model(TOP1), placement=stale)
    two = Placement(_round_robin(TOP1, 2), 2, "round_robin", 0.0)
    with pytest.raises(EffdlError, match="placement is for 2 ranks but the world size is 1"):
        ExpertParallel(_model(TOP1), placement=two)

    runner = ExpertParallel(_model(TOP1), "coherent")
    with pytest.raises(EffdlError, match="every request needs a non-empty prompt"):
        runner.generate([[1, 2], []], 3)
    with pytest.raises(EffdlError, match="every request needs a non-empty prompt"):
        runner.generate([], 3)
    with pytest.raises(EffdlError, match="max_new_tokens must be >= 1, got 0"):
        runner.generate([[1, 2]], 0)
    with pytest.raises(
        EffdlError, match=r"prompt \+ max_new_tokens reach 1025 tokens, past the model's max_seq_len 1024"
    ):
        runner.generate([[1], [5] * 1000], 25)
    with pytest.raises(EffdlError, match=r"token id 258 is outside the vocabulary \[0, 258\)"):
        runner.generate([[1, 2], [3, 258, -1]], 3)
    with pytest.raises(EffdlError, match=r"token id -1 is outside the vocabulary \[0, 258\)"):
        runner.generate([[-1]], 3)


# The throughput benchmark's setting: gpt-moe-16e (16 experts, top-1, dim 128) on 4 ranks, 32 requests.
BENCH, BENCH_WORLD, BENCH_REQUESTS, BENCH_NEW = "gpt-moe-16e", 4, 32, 3


def _rank_both_modes(rank: int, prompts: list[list[int]]):
    torch.set_num_threads(1)  # as in _one_thread
    return {mode: (gen.tokens, gen.stats) for mode in MODES
            for gen in [ExpertParallel(_model(BENCH), mode).generate(prompts, BENCH_NEW)]}


def test_coherent_sends_fewer_bytes_than_standard():
    """In the benchmark's setting, coherent mode's one all-to-all per layer carries fewer bytes than standard's
    two: its slots are sized by the tokens each sender holds (B/G on average), not by all B requests.

    Decode bytes per layer and step, all ranks together, by hand (4-byte floats, G ranks, B requests, D dim,
    every rank holding E/G >= 1 experts per layer, so one token lands at most once on a rank):
    standard: each rank sends each peer a 1-value header and its B/G home tokens' slots of D + 1 (hidden,
      expert), then every copy comes back as D values: 4 (G (G + B (D + 1)) + B D);
    coherent: each rank sends each peer a header (its count, then the tokens continuing on every rank) and
      slots of D + 5 (hidden, weight, request, expert, primary rank, choice) for every token it holds; the
      held tokens add up to B whatever the routing: 4 G (G (1 + G) + B (D + 5)).
    """
    cfg = ModelConfig.preset(BENCH)
    G, B, D = BENCH_WORLD, BENCH_REQUESTS, cfg.dim
    prompts = [torch.randint(0, 258, (8,), generator=torch.Generator().manual_seed(100 + b)).tolist() for b in range(B)]
    runs = spawn(_rank_both_modes, G, prompts, timeout_s=300)[0]

    model, seqs = _model(BENCH), torch.tensor(prompts)  # the single-process reference: full forwards, greedy
    with torch.no_grad():
        for _ in range(BENCH_NEW):
            seqs = torch.cat((seqs, model(seqs)[:, -1].argmax(-1, keepdim=True)), 1)
    steps, n_layers = BENCH_NEW - 1, cfg.n_layers
    want = {"standard": 4 * (G * (G + B * (D + 1)) + B * D), "coherent": 4 * G * (G * (1 + G) + B * (D + 5))}
    for mode, (tokens, stats) in runs.items():
        assert tokens == seqs[:, 8:].tolist()
        assert stats.bytes_total["decode"] == [steps * want[mode]] * n_layers
    standard, coherent = runs["standard"][1], runs["coherent"][1]
    for layer in range(n_layers):
        assert coherent.bytes_total["decode"][layer] < standard.bytes_total["decode"][layer]
        assert coherent.bytes_cross["decode"][layer] < standard.bytes_cross["decode"][layer]
