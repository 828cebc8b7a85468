"""FPDT against the plain model with the same weights: loss and every parameter gradient, 1 and 2 ranks."""

import pytest
import torch

from effdl.core.config import ModelConfig
from effdl.core.transformer import Transformer
from effdl.distributed import spawn
from effdl.errors import EffdlError
from effdl.fpdt.baselines import checkpointed_loss, ulysses_loss
from effdl.fpdt.pipeline import FPDTConfig, fpdt_loss
from effdl.train.lm import lm_loss

TINY = ModelConfig.preset("tiny", n_layers=2)  # GQA: 4 query heads, 2 key/value heads
SEQ, CHUNK = 2048, 256


def _model(cfg=TINY):
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.reset_parameters(std=0.1)  # wider than the default so gradients are far from zero everywhere
    return model


def _batch(seq=SEQ, batch=2, vocab=TINY.vocab_size):
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=gen)
    targets = tokens[:, 1:].clone()
    targets[0, :7] = -100  # ignored positions must be ignored alike
    return tokens[:, :-1], targets


def _loss_and_grads(loss_fn, model, tokens, targets):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, tokens, targets)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same(got, want, rtol=2e-5):
    (loss, grads), (ref_loss, ref_grads) = got, want
    assert abs(loss - ref_loss) <= rtol * abs(ref_loss)
    for name, ref in ref_grads.items():
        g = torch.as_tensor(grads[name])
        assert (g - ref).norm() <= rtol * 10 * ref.norm(), name


@pytest.fixture(scope="module")
def reference():
    return _loss_and_grads(lm_loss, _model(), *_batch())


@pytest.mark.parametrize("offload", ["none", "host", "disk"])
def test_fpdt_equals_plain_training(offload, reference, tmp_path):
    stores = []
    cfg = FPDTConfig(chunk_size=CHUNK, offload=offload, spill_dir=str(tmp_path))
    got = _loss_and_grads(lambda m, x, y: fpdt_loss(m, x, y, cfg, on_store=stores.append), _model(), *_batch())
    _assert_same(got, reference)
    if offload == "disk":
        assert stores[0].offloaded_bytes == 0 and not stores[0].folder.exists()  # emptied and removed
        assert list(tmp_path.iterdir()) == []


def test_odd_length_and_chunk_and_math_backend():
    tokens, targets = _batch(seq=301)
    model = _model()
    want = _loss_and_grads(lm_loss, model, tokens, targets)
    cfg = FPDTConfig(chunk_size=64, offload="none", backend="math")
    _assert_same(_loss_and_grads(lambda m, x, y: fpdt_loss(m, x, y, cfg), model, tokens, targets), want)


def test_qkv_bias_tied_embeddings_and_eval_mode():
    cfg = TINY.replace(qkv_bias=True, tie_embeddings=True)
    tokens, targets = _batch(seq=300)
    model = _model(cfg)
    want = _loss_and_grads(lm_loss, model, tokens, targets)
    fpdt = FPDTConfig(chunk_size=128, offload="disk")
    _assert_same(_loss_and_grads(lambda m, x, y: fpdt_loss(m, x, y, fpdt), model, tokens, targets), want)
    with torch.no_grad():  # evaluation: no graph, nothing left in the store
        stores = []
        assert abs(fpdt_loss(model, tokens, targets, fpdt, on_store=stores.append).item() - want[0]) < 1e-4
        assert stores[0].chunk_keys() == []


def test_checkpointed_baseline_equals_plain(reference):
    _assert_same(_loss_and_grads(checkpointed_loss, _model(), *_batch()), reference)


def _rank_losses(rank, offload, method, seq):
    model = _model()
    tokens, targets = _batch(seq=seq)
    if method == "fpdt":
        cfg = FPDTConfig(chunk_size=CHUNK, offload=offload, sp_size=2)
        fn = lambda m, x, y: fpdt_loss(m, x, y, cfg)  # noqa: E731
    else:
        fn = ulysses_loss
    loss, grads = _loss_and_grads(fn, model, tokens, targets)
    return loss, {n: g.numpy() for n, g in grads.items()}


@pytest.mark.parametrize(("method", "offload", "seq"), [("fpdt", "disk", SEQ), ("fpdt", "none", 2047),
                                                        ("ulysses", "none", 2047)])
def test_two_ranks_equal_one_process(method, offload, seq):
    model = _model()
    tokens, targets = _batch(seq=seq)
    want = _loss_and_grads(lm_loss, model, tokens, targets)
    for got in spawn(_rank_losses, 2, offload, method, seq, timeout_s=300):
        _assert_same(got, want)


def _bad_heads(rank):
    model = _model(TINY.replace(n_kv_heads=1))
    with pytest.raises(EffdlError, match="not divisible by sp_size 2"):
        fpdt_loss(model, *_batch(seq=512), FPDTConfig(chunk_size=128, sp_size=2))
    with pytest.raises(EffdlError, match="process group has 2 ranks"):
        fpdt_loss(_model(), *_batch(seq=512), FPDTConfig(chunk_size=128, sp_size=1))


def test_bad_input(tmp_path):
    model = _model()
    tokens, targets = _batch(seq=512)
    with pytest.raises(EffdlError, match="chunk_size must be positive"):
        FPDTConfig(chunk_size=0)
    with pytest.raises(EffdlError, match="divisible by sp_size"):
        FPDTConfig(chunk_size=129, sp_size=2)
    with pytest.raises(EffdlError, match="longer than the sequence"):
        fpdt_loss(model, tokens, targets, FPDTConfig(chunk_size=1024))
    with pytest.raises(EffdlError, match="must both be"):
        fpdt_loss(model, tokens, targets[:, :-1], FPDTConfig(chunk_size=128))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(EffdlError, match="not writable"):
        fpdt_loss(model, tokens, targets, FPDTConfig(chunk_size=128, spill_dir=str(blocker / "x")))
    with pytest.raises(EffdlError, match="sliding-window"):
        fpdt_loss(_model(TINY.replace(sliding_window=64)), tokens, targets, FPDTConfig(chunk_size=128))
    spawn(_bad_heads, 2)


def test_failed_run_leaves_no_spill_files(tmp_path):
    model = _model()

    def explode(*_):
        raise RuntimeError("layer 1 failed")

    model.layers[1].feed_forward.register_forward_hook(explode)
    with pytest.raises(RuntimeError, match="layer 1 failed"):
        fpdt_loss(model, *_batch(seq=512), FPDTConfig(chunk_size=128, spill_dir=str(tmp_path)))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["output", "layers.1.feed_forward.w2", "layers.0.attention.wqkv",
                                   "tok_embeddings"])
def test_failed_backward_removes_the_spill_folder_at_once(where, tmp_path):
    """A gradient hook raises in the LM head's, a layer's FFN or QKV, or the embedding's backward (after the
    pipeline's): the spill folder is gone as the error arrives, with the graph still alive, and the next step
    computes exactly what a model that never failed does."""
    cfg = FPDTConfig(chunk_size=128, offload="disk", spill_dir=str(tmp_path))
    tokens, targets = _batch(seq=512)
    model, stores = _model(), []

    def explode(grad):
        raise RuntimeError(f"{where} backward failed")

    hook = model.get_submodule(where).weight.register_hook(explode)
    loss = fpdt_loss(model, tokens, targets, cfg, on_store=stores.append)
    assert stores[0].folder.exists()
    with pytest.raises(RuntimeError, match=f"{where} backward failed"):
        loss.backward()
    assert list(tmp_path.iterdir()) == []  # `loss` still holds the graph and its store: no finalizer has run
    hook.remove()
    got = _loss_and_grads(lambda m, x, y: fpdt_loss(m, x, y, cfg), model, tokens, targets)
    want = _loss_and_grads(lambda m, x, y: fpdt_loss(m, x, y, cfg), _model(), tokens, targets)
    assert got[0] == want[0]
    for name, grad in want[1].items():
        assert torch.equal(got[1][name], grad), name
    assert list(tmp_path.iterdir()) == []


def test_hf_llama_checkpoint_under_fpdt_matches_transformers(tmp_path):
    """A transformers Llama, saved and loaded by effdl.core.hf, trained by FPDT: HF's own loss and gradients."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from effdl.core.hf import load_checkpoint

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                      attn_implementation="sdpa"))
    hf.save_pretrained(tmp_path)
    tokens = torch.randint(0, 300, (1, 1025), generator=torch.Generator().manual_seed(0))
    hf_loss = hf(tokens, labels=tokens).loss
    hf_loss.backward()
    ours = load_checkpoint(tmp_path, dtype=torch.float32)
    loss = fpdt_loss(ours, tokens[:, :-1], tokens[:, 1:], FPDTConfig(chunk_size=256, offload="disk"))
    loss.backward()
    assert abs(loss.item() - hf_loss.item()) < 1e-5
    torch.testing.assert_close(ours.tok_embeddings.weight.grad, hf.model.embed_tokens.weight.grad, rtol=1e-4,
                               atol=1e-7)
    torch.testing.assert_close(ours.layers[0].feed_forward.w2.weight.grad, hf.model.layers[0].mlp.down_proj.weight.grad,
                               rtol=1e-4, atol=1e-7)
