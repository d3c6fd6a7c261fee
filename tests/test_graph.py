"""Graph inspection (text and DOT) and the rotation-trick estimator against its formula."""
import re

import numpy as np
import pytest

import minivq as mv
from minivq import functional as F, nn


def small_step():
    mv.manual_seed(0)
    vq = nn.VectorQuantizer(4, 2)
    z = mv.tensor(np.random.default_rng(0).standard_normal((1, 2, 2, 2)).astype(np.float32), requires_grad=True)
    z.name = "z_e"
    out = vq(z)
    loss = (out.quantized ** 2).mean() + out.loss
    return vq, z, out, loss


def test_text_graph_names_nodes_shapes_and_gradient_norms():
    vq, z, out, loss = small_step()
    text = mv.graph.format_graph(loss, names=dict(vq.named_parameters()))
    assert "StraightThrough" in text and "StopGradient" in text and "(1, 2, 2, 2)" in text
    assert "codebook" in text and "z_e" in text
    columns = [re.split(r"\s{2,}", line) for line in text.splitlines()]
    assert columns[0][:4] == ["#", "node", "output shape", "grad norm"]
    assert all(row[3] == "-" for row in columns[1:])     # no backward recorded yet
    with mv.graph.record_grad_norms():
        loss.backward()
    rows = {row[1]: row for row in (re.split(r"\s{2,}", line)
                                    for line in mv.graph.format_graph(loss).splitlines()[1:])}
    # the straight-through node's output gradient is d mean(q^2)/dq = 2 q / numel
    expected = np.linalg.norm(2 * out.quantized.data / out.quantized.data.size)
    st = [fn for fn in mv.graph.nodes(loss) if fn.name == "StraightThrough"][0]
    assert st.grad_norms[0] == pytest.approx(expected, rel=1e-5)
    assert rows["StraightThrough"][2] == "(1, 2, 2, 2)"
    assert float(rows["StraightThrough"][3]) == pytest.approx(expected, rel=1e-3)
    assert mv.autograd.get_backward_hook() is None      # the hook is gone after the block


def test_nodes_come_in_backward_order_each_once():
    vq, z, out, loss = small_step()
    order = mv.graph.nodes(loss)
    gens = [fn.generation for fn in order]
    assert gens == sorted(gens, reverse=True)
    assert len({id(fn) for fn in order}) == len(order)
    assert order[0] is loss.creator


def test_dot_output_is_well_formed():
    vq, z, out, loss = small_step()
    dot = mv.graph.to_dot(loss, names=dict(vq.named_parameters()))
    assert dot.startswith("digraph backward {") and dot.endswith("}")
    assert dot.count("{") == dot.count("}")
    assert 'label="StraightThrough' in dot and "fillcolor" in dot and 'label="codebook"' in dot
    edges = [line for line in dot.splitlines() if "->" in line]
    assert len(edges) >= len(mv.graph.nodes(loss))


def rotation_matrix(e, q):
    """R = I - 2 r r^T + 2 q^ e^T, built explicitly."""
    e_hat, q_hat = e / np.linalg.norm(e), q / np.linalg.norm(q)
    r = (e_hat + q_hat) / np.linalg.norm(e_hat + q_hat)
    return np.eye(len(e)) - 2 * np.outer(r, r) + 2 * np.outer(q_hat, e_hat)


@pytest.mark.parametrize("d", [2, 3, 7])
def test_rotation_trick_matches_its_formula(d):
    rng = np.random.default_rng(d)
    z_e = rng.standard_normal((2, d, 3, 2))
    z_q = rng.standard_normal((2, d, 3, 2))
    g = rng.standard_normal((2, d, 3, 2))
    e = mv.tensor(z_e, requires_grad=True)
    out = F.rotation_trick(e, mv.tensor(z_q))
    np.testing.assert_array_equal(out.data, z_q)
    out.backward(g)
    assert out.creator.name == "RotationTrick"
    for n in range(2):
        for i in range(3):
            for j in range(2):
                ev, qv = z_e[n, :, i, j], z_q[n, :, i, j]
                R = rotation_matrix(ev, qv)
                lam = np.linalg.norm(qv) / np.linalg.norm(ev)
                np.testing.assert_allclose(lam * R @ ev, qv, rtol=1e-10, atol=1e-12)   # it maps e to q
                np.testing.assert_allclose(R.T @ R, np.eye(d), atol=1e-12)            # a rotation
                np.testing.assert_allclose(e.grad[n, :, i, j], lam * R.T @ g[n, :, i, j], rtol=1e-10, atol=1e-12)


def test_rotation_estimator_in_the_quantizer():
    mv.manual_seed(1)
    vq = nn.VectorQuantizer(5, 3, estimator="rotation")
    out = vq(mv.tensor(np.random.default_rng(1).standard_normal((1, 3, 2, 2)).astype(np.float32),
                       requires_grad=True))
    assert out.quantized.creator.name == "RotationTrick"
    with pytest.raises(ValueError, match="estimator"):
        nn.VectorQuantizer(5, 3, estimator="gumbel")


def test_backward_hook_sees_every_node_once_and_nests_under_record_grad_norms():
    vq, z, out, loss = small_step()
    seen, outer_seen = [], []
    with mv.autograd.backward_hook(lambda fn, grads: outer_seen.append(fn)):
        with mv.graph.record_grad_norms():
            with mv.autograd.backward_hook(lambda fn, grads: seen.append((fn, [g.shape for g in grads]))):
                pass                                 # an inner hook that ended restores record_grad_norms'
            loss.backward()
        assert mv.autograd.get_backward_hook() is not None and seen == []
    assert mv.autograd.get_backward_hook() is None
    ran = mv.graph.nodes(loss)
    assert sorted(map(id, outer_seen)) == sorted(map(id, ran))          # each node once, the outer hook kept
    assert all(fn.grad_norms is not None for fn in ran)
    with pytest.raises(TypeError):
        mv.autograd.set_backward_hook("not callable")
