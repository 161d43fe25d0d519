"""Triton tree attention: the forward kernel of a speculative verification step, its launcher and a split combine.

Every tree row attends to the whole prefix (the KV cache before the tree) and to the tree keys its packed ancestor
bitmask allows (see `reference.py` for the format and the float64 ground truth). No dense mask is ever built.

One program handles `BLOCK_M` rows that share a KV head: the query heads of a GQA group are packed with the tree
nodes into one row dimension (`row = group_member * num_nodes + node`), so each key/value block is read once per group
instead of once per query head. With few rows (small trees) there are too few programs to fill a GPU, so the prefix is
split across programs (`num_splits`, "flash-decoding"): each split writes an unnormalised partial result with its
running max and sum, and a second kernel combines them. Softmax runs online in fp32 (base 2), so rows that see no key
(padding rows) come out as zeros, never NaN.

`@triton.jit` chooses compiled or interpreted execution when it decorates, i.e. when triton (whose own `tl.sum`,
`tl.max`, ... are jit functions) and this module are imported: to run the kernels on CPU tensors set
`TRITON_INTERPRET=1` before Python starts (`INTERPRETED` tells which mode this import got). Interpreted bf16 runs
work around two interpreter gaps (see `tree_attention`); compiled kernels do not need them.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .reference import num_words

LOG2E = 1.4426950408889634
MAX_TREE_NODES = 512
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_SPLIT_KEYS = 256  # fewest prefix keys worth a split of their own


@triton.jit
def _attend_block(
    q, k, v, visible, m_i, l_i, acc, qk_scale,
    QK_PRECISION: tl.constexpr, QK_FP32: tl.constexpr, PV_FP32: tl.constexpr, PV_PRECISION: tl.constexpr,
):
    """One online-softmax step over a key block: `k` is `(HEAD_DIM_PAD, BLOCK_N)`, `v` is `(BLOCK_N, HEAD_DIM_PAD)`."""
    if QK_FP32:
        qk = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision=QK_PRECISION)
    else:
        qk = tl.dot(q, k, input_precision=QK_PRECISION)
    qk = qk * qk_scale
    qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: keep exp2 away from -inf - -inf
    p = tl.math.exp2(qk - m_ref[:, None])
    alpha = tl.math.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    if PV_FP32:
        pv = tl.dot(p, v.to(tl.float32), input_precision=PV_PRECISION)
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


@triton.jit
def _round_to_bf16(x):
    """fp32 -> the nearest bfloat16 value (ties to even), kept in fp32 so that the cast after it is exact. Only for
    Triton's interpreter, whose fp32 -> bf16 cast truncates (compiled kernels round to nearest even themselves)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _tree_attention_fwd_kernel(
    Q, K, V, Out, Bits, AccSplit, MSplit, LSplit,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_bb, stride_bt, stride_bw,
    num_kv_heads, num_nodes, prefix_length, num_bit_words, prefix_chunk, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, WORDS_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
    QK_PRECISION: tl.constexpr, QK_FP32: tl.constexpr, PV_FP32: tl.constexpr, PV_PRECISION: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)  # batch * num_kv_heads + kv_head
    split = tl.program_id(2)
    batch = (pid_bh // num_kv_heads).to(tl.int64)
    kv_head = (pid_bh % num_kv_heads).to(tl.int64)

    # Rows of this program: query heads of the GQA group x tree nodes, flattened.
    num_rows = GROUP * num_nodes
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < num_rows
    node = rows % num_nodes
    head = kv_head * GROUP + rows // num_nodes
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_in = dims < HEAD_DIM

    q_ptrs = Q + batch * stride_qb + head[:, None] * stride_qh + node[:, None] * stride_qt + dims[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_in[:, None] & dim_in[None, :], other=0.0)

    bits_rows = Bits + batch * stride_bb + node * stride_bt
    words = tl.arange(0, WORDS_PAD)
    row_words = tl.load(
        bits_rows[:, None] + words[None, :] * stride_bw,
        mask=row_in[:, None] & (words < num_bit_words)[None, :],
        other=0,
    )
    row_live = tl.sum((row_words != 0).to(tl.int32), 1) > 0  # a row with no bit set is padding: it sees nothing

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    k_base = K + batch * stride_kb + kv_head * stride_kh
    v_base = V + batch * stride_vb + kv_head * stride_vh
    offs_n = tl.arange(0, BLOCK_N)

    # 1. This split's share of the prefix: every live row sees every key.
    start = split * prefix_chunk
    end = tl.minimum(start + prefix_chunk, prefix_length)
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        col_in = cols < end
        k = tl.load(
            k_base + cols[None, :] * stride_kn + dims[:, None] * stride_kd,
            mask=col_in[None, :] & dim_in[:, None],
            other=0.0,
        )
        v = tl.load(
            v_base + cols[:, None] * stride_vn + dims[None, :] * stride_vd,
            mask=col_in[:, None] & dim_in[None, :],
            other=0.0,
        )
        visible = row_live[:, None] & col_in[None, :]
        m_i, l_i, acc = _attend_block(
            q, k, v, visible, m_i, l_i, acc, qk_scale, QK_PRECISION, QK_FP32, PV_FP32, PV_PRECISION
        )

    # 2. The tree keys (last split only), each visible when its bit is set in the row's packed ancestor mask.
    if split == tl.num_programs(2) - 1:
        for start_n in range(0, num_nodes, BLOCK_N):
            cols = start_n + offs_n
            col_in = cols < num_nodes
            k = tl.load(
                k_base + (prefix_length + cols)[None, :] * stride_kn + dims[:, None] * stride_kd,
                mask=col_in[None, :] & dim_in[:, None],
                other=0.0,
            )
            v = tl.load(
                v_base + (prefix_length + cols)[:, None] * stride_vn + dims[None, :] * stride_vd,
                mask=col_in[:, None] & dim_in[None, :],
                other=0.0,
            )
            word = tl.load(
                bits_rows[:, None] + (cols // 32)[None, :] * stride_bw,
                mask=row_in[:, None] & col_in[None, :],
                other=0,
            )
            visible = ((word >> (cols % 32)[None, :]) & 1) != 0
            m_i, l_i, acc = _attend_block(
                q, k, v, visible, m_i, l_i, acc, qk_scale, QK_PRECISION, QK_FP32, PV_FP32, PV_PRECISION
            )

    if SPLIT:
        # Partial results, rows flattened as (batch, head, node): pid_bh * num_rows + rows is exactly that index.
        ws_rows = (split * tl.num_programs(1) + pid_bh).to(tl.int64) * num_rows + rows
        tl.store(MSplit + ws_rows, m_i, mask=row_in)
        tl.store(LSplit + ws_rows, l_i, mask=row_in)
        tl.store(
            AccSplit + ws_rows[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_in[:, None] & dim_in[None, :]
        )
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        if ROUND_BF16:
            out = _round_to_bf16(out)
        o_ptrs = Out + batch * stride_ob + head[:, None] * stride_oh + node[:, None] * stride_ot
        o_ptrs += dims[None, :] * stride_od
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_in[:, None] & dim_in[None, :])


@triton.jit
def _tree_attention_combine_kernel(
    AccSplit, MSplit, LSplit, Out,
    stride_ob, stride_oh, stride_ot, stride_od,
    num_heads, num_nodes, num_rows, num_splits,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_R: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    """Merges the splits' `(max, sum, unnormalised output)` per row (rows flattened as `(batch, head, node)`)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_in = rows < num_rows
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_in = dims < HEAD_DIM
    m_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for split in range(num_splits):
        m_max = tl.maximum(m_max, tl.load(MSplit + split * num_rows + rows, mask=row_in, other=float("-inf")))
    m_ref = tl.where(m_max == float("-inf"), 0.0, m_max)
    l_sum = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DIM_PAD], tl.float32)
    for split in range(num_splits):
        ws_rows = split * num_rows + rows
        weight = tl.math.exp2(tl.load(MSplit + ws_rows, mask=row_in, other=float("-inf")) - m_ref)
        l_sum += weight * tl.load(LSplit + ws_rows, mask=row_in, other=0.0)
        part = tl.load(
            AccSplit + ws_rows.to(tl.int64)[:, None] * HEAD_DIM + dims[None, :],
            mask=row_in[:, None] & dim_in[None, :],
            other=0.0,
        )
        acc += weight[:, None] * part
    out = acc / tl.where(l_sum == 0.0, 1.0, l_sum)[:, None]
    if ROUND_BF16:
        out = _round_to_bf16(out)
    batch = (rows // (num_heads * num_nodes)).to(tl.int64)
    head = (rows // num_nodes) % num_heads
    node = rows % num_nodes
    o_ptrs = Out + batch[:, None] * stride_ob + head[:, None] * stride_oh + node[:, None] * stride_ot
    o_ptrs += dims[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_in[:, None] & dim_in[None, :])


INTERPRETED: bool = not isinstance(_tree_attention_fwd_kernel, triton.runtime.JITFunction)
# Triton's own helpers (tl.sum, tl.max, tl.zeros, ...) are decorated when triton itself is imported; the interpreter
# can only run them if TRITON_INTERPRET=1 was already set then.
_TRITON_INTERPRETED: bool = not isinstance(tl.sum, triton.runtime.JITFunction)


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_num_splits(num_programs: int, prefix_length: int, device: torch.device) -> int:
    """Prefix splits that give about two programs per streaming multiprocessor, each split holding at least
    `MIN_SPLIT_KEYS` prefix keys. 1 off CUDA (the interpreter runs programs one after another)."""
    if device.type != "cuda" or prefix_length < 2 * MIN_SPLIT_KEYS:
        return 1
    wanted = triton.cdiv(2 * _multiprocessor_count(device.index or 0), num_programs)
    return max(1, min(wanted, prefix_length // MIN_SPLIT_KEYS))


def _check_inputs(q, k, v, prefix_length, tree_bits, num_splits) -> None:
    if not all(isinstance(t, torch.Tensor) and t.ndim == 4 for t in (q, k, v)):
        raise ValueError(
            "tree_attention expects 4D q `(batch, num_heads, num_nodes, head_dim)` and k, v "
            "`(batch, num_kv_heads, prefix_length + num_nodes, head_dim)`"
        )
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"tree_attention supports float16, bfloat16 and float32 with one dtype for q, k and v; got "
            f"{q.dtype}, {k.dtype}, {v.dtype}: cast them first"
        )
    if not isinstance(tree_bits, torch.Tensor):
        raise ValueError(f"tree_bits must be an int32 tensor (pack_ancestor_mask builds it), got {type(tree_bits)}")
    if not (q.device == k.device == v.device == tree_bits.device):
        raise ValueError(
            f"q, k, v and tree_bits must be on one device, got {q.device}, {k.device}, {v.device}, {tree_bits.device}"
        )
    batch, num_heads, num_nodes, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[-1] != head_dim:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if num_heads % k.shape[1]:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({k.shape[1]})")
    if not 1 <= num_nodes <= MAX_TREE_NODES:
        raise ValueError(f"tree_attention supports 1 to {MAX_TREE_NODES} tree nodes, got {num_nodes}")
    if not 1 <= head_dim <= 256:
        raise ValueError(f"tree_attention supports head_dim up to 256, got {head_dim}")
    if not isinstance(prefix_length, int) or prefix_length < 0 or k.shape[2] != prefix_length + num_nodes:
        raise ValueError(
            f"k and v must hold prefix_length + num_nodes = {prefix_length} + {num_nodes} keys (the cache after the "
            f"tree's keys were appended), got {k.shape[2]}"
        )
    expected = (num_nodes, num_words(num_nodes))
    if tree_bits.dtype != torch.int32 or tuple(tree_bits.shape[-2:]) != expected or tree_bits.ndim not in (2, 3) or (
        tree_bits.ndim == 3 and tree_bits.shape[0] != batch
    ):
        raise ValueError(
            f"tree_bits must be int32 of shape {expected} or {(batch, *expected)} (pack_ancestor_mask builds it), "
            f"got {tree_bits.dtype} {tuple(tree_bits.shape)}"
        )
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if q.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(
            f"tree_attention got {q.device.type} tensors but its kernels were compiled for a GPU: move the tensors to "
            "CUDA, or run them in Triton's interpreter by setting TRITON_INTERPRET=1 before Python starts"
        )
    if INTERPRETED and not _TRITON_INTERPRETED:
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after triton was imported, so Triton's own helpers are compiled-only and the "
            "interpreter cannot run them: set it before Python starts (e.g. `TRITON_INTERPRET=1 python ...`)"
        )


def tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_length: int,
    tree_bits: torch.IntTensor,
    scale: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of tree rows over a prefix plus their own ancestors (forward only).

    Args:
        q (`torch.Tensor` of shape `(batch, num_heads, num_nodes, head_dim)`): the tree rows' queries, any strides.
        k, v (`torch.Tensor` of shape `(batch, num_kv_heads, prefix_length + num_nodes, head_dim)`): the KV cache
            after the tree's keys were appended; `num_heads` is a multiple of `num_kv_heads` (MHA, GQA, MQA).
        prefix_length (`int`): leading keys every live tree row sees.
        tree_bits (`torch.IntTensor` of shape `(num_nodes, ceil(num_nodes / 32))` or `(batch, num_nodes, ...)`):
            packed ancestor mask (bit `j % 32` of word `j // 32` in row `i`: node `i` sees node `j`); a row with no
            bit set is padding and comes out as zeros. Build it with [`pack_ancestor_mask`].
        scale (`float`, *optional*): softmax scale, `head_dim ** -0.5` by default.
        num_splits (`int`, *optional*): programs sharing one row block's prefix (combined by a second kernel);
            chosen from the GPU's size by default, 1 on CPU.

    Returns:
        `torch.Tensor` of shape `(batch, num_heads, num_nodes, head_dim)` in q's dtype: a view of a contiguous
        `(batch, num_nodes, num_heads, head_dim)` buffer, so `.transpose(1, 2)` is contiguous (the layout
        attention modules feed to their output projection).
    """
    _check_inputs(q, k, v, prefix_length, tree_bits, num_splits)
    batch, num_heads, num_nodes, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    scale = head_dim**-0.5 if scale is None else float(scale)
    bit_words = tree_bits.shape[-1]
    stride_bb = tree_bits.stride(0) if tree_bits.ndim == 3 else 0

    num_rows = group * num_nodes
    block_m = 16 if num_rows <= 16 else 32 if num_rows <= 32 else 64
    block_n = 64
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    row_blocks = triton.cdiv(num_rows, block_m)
    if num_splits is None:
        num_splits = default_num_splits(row_blocks * batch * num_kv_heads, prefix_length, q.device)
    # Whole key blocks per split; recount so that no split is empty.
    prefix_chunk = triton.cdiv(triton.cdiv(prefix_length, num_splits), block_n) * block_n if prefix_length else 0
    num_splits = triton.cdiv(prefix_length, prefix_chunk) if prefix_length else 1

    out = torch.empty(batch, num_nodes, num_heads, head_dim, dtype=q.dtype, device=q.device).transpose(1, 2)
    if num_splits > 1:
        total_rows = batch * num_heads * num_nodes
        acc_split = torch.empty(num_splits, total_rows, head_dim, dtype=torch.float32, device=q.device)
        m_split = torch.empty(num_splits, total_rows, dtype=torch.float32, device=q.device)
        l_split = torch.empty_like(m_split)
    else:
        acc_split = m_split = l_split = out  # unused (SPLIT=False): any tensor will do

    fp32 = q.dtype == torch.float32
    # Triton's interpreter handles bf16 with two gaps: it multiplies bf16 blocks as raw 16-bit integers and its
    # fp32 -> bf16 cast truncates. Interpreted bf16 runs feed fp32 to the QK dot (exact for bf16 values) and round
    # the output explicitly; compiled kernels do neither.
    interpreted_bf16 = INTERPRETED and q.dtype == torch.bfloat16
    _tree_attention_fwd_kernel[(row_blocks, batch * num_kv_heads, num_splits)](
        q, k, v, out, tree_bits, acc_split, m_split, l_split,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        stride_bb, tree_bits.stride(-2), tree_bits.stride(-1),
        num_kv_heads, num_nodes, prefix_length, bit_words, prefix_chunk, scale * LOG2E,
        GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, WORDS_PAD=triton.next_power_of_2(bit_words),
        BLOCK_M=block_m, BLOCK_N=block_n, SPLIT=num_splits > 1,
        # fp32 inputs get exact fp32 products; bf16 probabilities go through tf32 (fp16 rounding of p loses too much
        # in bf16's narrow mantissa budget), fp16 ones stay fp16 as in flash-attention.
        QK_PRECISION="ieee" if fp32 else "tf32",
        QK_FP32=interpreted_bf16,
        PV_FP32=q.dtype != torch.float16,
        PV_PRECISION="ieee" if fp32 else "tf32",
        ROUND_BF16=interpreted_bf16,
        num_warps=4,
        num_stages=2 if fp32 or head_dim_pad > 128 else 3,
    )
    if num_splits > 1:
        block_r = 32
        _tree_attention_combine_kernel[(triton.cdiv(total_rows, block_r),)](
            acc_split, m_split, l_split, out,
            *out.stride(),
            num_heads, num_nodes, total_rows, num_splits,
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_R=block_r, ROUND_BF16=interpreted_bf16,
            num_warps=4,
        )
    return out
