"""The attention kernel `auto` picks (dtrain.attention), and that packed rows keep their documents apart under the
kernel picked: the batch dtrain hands a flash kernel is one transformers runs as varlen, for any batch size."""

from __future__ import annotations

import sys

import pytest
import torch

from dtrain.attention import choose_attention, flash_attn_problem

BF16, FP32 = torch.bfloat16, torch.float32


@pytest.mark.parametrize(
    "configured, device, dtype, packing, problem, expected",
    [
        ("auto", "cuda", BF16, True, None, "flash_attention_2"),
        ("auto", "cuda", torch.float16, False, None, "flash_attention_2"),
        ("auto", "cuda", BF16, True, "flash-attn is not installed", "sdpa"),
        ("auto", "cuda", FP32, True, None, "sdpa"),  # flash-attn has no fp32 kernel
        ("auto", "cpu", BF16, True, None, "sdpa"),
        ("eager", "cuda", BF16, True, None, "eager"),  # an explicit choice is kept
        ("sdpa", "cuda", BF16, True, None, "sdpa"),
    ],
)
def test_choice(configured, device, dtype, packing, problem, expected):
    choice = choose_attention(configured, device, dtype, packing, problem)
    assert choice.implementation == expected
    assert choice.line().startswith(f"attention: {expected} (") and choice.reason


def test_a_flash_attn_that_does_not_import_means_sdpa_and_a_warning(tmp_path, monkeypatch):
    """A wheel built for another torch/CUDA: find_spec finds it, its import fails (as it would in every rank's
    from_pretrained). auto must not pick it."""
    package = tmp_path / "flash_attn"
    package.mkdir()
    (package / "__init__.py").write_text(
        "raise ImportError('flash_attn_2_cuda.cpython-311-x86_64-linux-gnu.so: "
        "undefined symbol: _ZN3c104cuda9SetDevice')"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    problem = flash_attn_problem()
    assert problem is not None and "does not import" in problem and "undefined symbol" in problem
    choice = choose_attention("auto", "cuda", BF16, True, problem)
    assert choice.implementation == "sdpa" and "WARNING" in choice.line() and "reinstall" in choice.line()


def test_check_names_the_choice_for_this_machine(tmp_path, tiny_model):
    """`dtrain check` prints what a run of the config would take here: sdpa on this CPU machine (~10 s)."""
    from tests.helpers import run_dtrain, write_config

    config = write_config(tmp_path / "cfg.yaml", tiny_model)
    out = run_dtrain("check", str(config)).stdout
    expected = "sdpa (flash-attn kernels need CUDA; this is cpu)" if not torch.cuda.is_available() else ""
    assert f"  attention    {expected}" in out, out


# -- packed rows under a flash kernel, on CPU --------------------------------------------------------------------
# transformers' own flash-attention code path (integrations/flash_attention.py -> _flash_attention_forward) decides
# between the dense kernel, the varlen kernel from explicit offsets, and varlen from position ids (batch size 1
# only). Here it runs with exact CPU stand-ins for flash-attn's two kernels, so its decision on dtrain's batch is
# what is tested: a dense call on a packed row lets documents attend to each other and changes the loss.


def _cpu_flash(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    """flash_attn_func on [B, T, H, D]: one dense (causal) sequence per row."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=softmax_scale, enable_gqa=True
    )
    return out.transpose(1, 2)


def _cpu_flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                      softmax_scale=None, causal=False):  # fmt: skip
    """flash_attn_varlen_func on [total, H, D]: each [cu[i], cu[i+1]) range is its own sequence."""
    assert isinstance(max_seqlen_q, int), "a tensor max length is read back to the host in every layer"
    out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        out[start:end] = _cpu_flash(q[None, start:end], k[None, start:end], v[None, start:end], 0.0, softmax_scale,
                                    causal)[0]  # fmt: skip
    return out


@pytest.fixture
def cpu_flash_kernels(monkeypatch):
    from transformers import modeling_flash_attention_utils as fa

    monkeypatch.setattr(fa, "_loaded_implementation", "flash_attention_2")
    monkeypatch.setattr(fa, "_flash_fn", _cpu_flash)
    monkeypatch.setattr(fa, "_flash_varlen_fn", _cpu_flash_varlen)
    monkeypatch.setattr(fa, "_process_flash_kwargs_fn", fa._lazy_define_process_function(_cpu_flash_varlen))


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.5, attn_implementation="sdpa")  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _documents() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, 128, (n,), generator=g).tolist() for n in (7, 5, 9, 4, 6)]


def _packed_rows(docs: list[list[int]], seq_len: int) -> list[dict[str, list[int]]]:
    """Two packed rows: documents 0-1 in the first, 2-4 in the second, laid out as dtrain packs them (every document
    starts with an unlabelled token, so no label is predicted across a boundary)."""
    from dtrain.data.formats import IGNORE

    rows = []
    for group in (docs[:2], docs[2:]):
        ids = [t for d in group for t in d]
        labels = [IGNORE if p == 0 else t for d in group for p, t in enumerate(d)]
        positions = [p for d in group for p in range(len(d))]
        rows.append({"input_ids": ids, "labels": labels, "position_ids": positions})
        assert len(ids) <= seq_len
    return rows


@torch.no_grad()
def _per_document_loss(model, docs: list[list[int]]) -> float:
    """Each document alone, sdpa, summed token losses / label tokens: what packing promises to equal."""
    total, count = 0.0, 0
    for doc in docs:
        ids = torch.tensor([doc])
        total += model(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(1.0)).loss.item()
        count += len(doc) - 1
    return total / count


def test_packed_batch_of_two_rows_is_varlen_for_transformers():
    """transformers' own functions on dtrain's batch: the offsets are the documents of the flattened batch, and
    position ids alone would not do (batch size 2)."""
    from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

    from dtrain.data import Batcher

    batch = Batcher(0, 24, packing=True, varlen=True, device=torch.device("cpu"))(_packed_rows(_documents(), 24))
    assert not _is_packed_sequence(batch["position_ids"], batch_size=2)  # why offsets are needed at all
    (cu_q, cu_k), (max_q, _) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert torch.equal(batch["cu_seq_lens_q"], cu_q) and torch.equal(batch["cu_seq_lens_k"], cu_k)
    assert batch["max_length_q"] == batch["max_length_k"] == int(max_q)
    # row 0: docs of 7 and 5 then 12 padding tokens; row 1: 9, 4, 6 then 5 padding tokens
    assert batch["cu_seq_lens_q"].tolist() == [0, 7, 12, 24, 33, 37, 43, 48]


def test_packed_rows_under_flash_attention_equal_the_documents_one_by_one(cpu_flash_kernels):
    """A packed micro batch of 2 rows through transformers' flash_attention_2 path: the loss of the documents one by
    one (sdpa), rel 1e-5. Position ids alone (what dtrain sent before) run each row densely: another loss."""
    from dtrain.data import Batcher

    model, docs = _tiny_llama(), _documents()
    expected = _per_document_loss(model, docs)
    model.config._attn_implementation = "flash_attention_2"
    losses = {}
    for varlen in (True, False):
        batch = Batcher(0, 24, packing=True, varlen=varlen, device=torch.device("cpu"))(_packed_rows(docs, 24))
        with torch.no_grad():
            losses[varlen] = model(**batch, num_items_in_batch=torch.tensor(1.0)).loss.item() / (len(sum(docs, [])) - 5)
    assert losses[True] == pytest.approx(expected, rel=1e-5)
    assert abs(losses[False] - expected) > 1e-3 * expected, "position ids alone: each row ran as one sequence"
