"""Value-output norms from the Gram matrix equal the explicit ||v_j W_O^h||."""

import pytest
import torch

from nanokv.kernels.value_norms import output_gram, value_output_norms


def explicit_norms(v, o_proj_weight, q_heads):
    """||v_j W_O^h|| with W_O^h = o_proj_weight[:, h*D:(h+1)*D].T, looping over query heads."""
    kv_heads, head_dim = v.shape[-3], v.shape[-1]
    group = q_heads // kv_heads
    rows = []
    for h in range(q_heads):
        w_o = o_proj_weight[:, h * head_dim : (h + 1) * head_dim].T.double()  # (D, hidden)
        rows.append((v[..., h // group, :, :].double() @ w_o).norm(dim=-1))  # (..., T)
    return torch.stack(rows, dim=-2)  # (..., H_q, T)


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gram_norms_equal_explicit_projection(group, head_dim, dtype):
    gen = torch.Generator().manual_seed(group * head_dim)
    kv_heads, hidden = 2, 96
    q_heads = kv_heads * group
    weight = (torch.randn(hidden, q_heads * head_dim, generator=gen) / head_dim**0.5).to(dtype)
    v = torch.randn(2, 3, kv_heads, 5, head_dim, generator=gen).to(dtype)  # (.., H_kv, T, D)
    gram = output_gram(weight, q_heads, head_dim)
    assert gram.shape == (q_heads, head_dim, head_dim) and gram.dtype == torch.float32
    norms = value_output_norms(v, gram)
    assert norms.shape == (2, 3, q_heads, 5) and norms.dtype == torch.float32
    torch.testing.assert_close(
        norms.double(), explicit_norms(v, weight, q_heads), rtol=1e-4, atol=1e-4
    )


def test_no_batch_dims_and_zero_values():
    """(H_kv, T, D) works too, and a zero value has norm exactly 0 (no NaN from the sqrt)."""
    weight = torch.randn(32, 4 * 8)
    v = torch.randn(2, 3, 8)
    v[1, 2] = 0
    norms = value_output_norms(v, output_gram(weight, 4, 8))
    torch.testing.assert_close(norms.double(), explicit_norms(v, weight, 4), rtol=1e-4, atol=1e-5)
    assert norms[2, 2] == 0 and norms[3, 2] == 0


def test_shape_errors_name_the_mismatch():
    with pytest.raises(ValueError, match="expected 4 x 8"):
        output_gram(torch.randn(32, 30), 4, 8)
    with pytest.raises(ValueError, match="does not fit"):
        value_output_norms(torch.randn(3, 2, 8), torch.randn(4, 8, 8))
