"""Graph inspection (text and DOT) and the rotation-trick estimator against its formula."""
import contextlib
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
    rows = {row[1].split(" -> ")[0]: row for row in (re.split(r"\s{2,}", line)
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
    # the two edges that carry no gradient back (StopGradient's input; StraightThrough's z_q) are dashed
    assert sum("style=dashed" in line for line in dot.splitlines() if "->" in line) == 3   # 2 StopGradients + ST
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


# ---------------------------------------------------------------- names, per-input gradients, scopes
def tiny_model(decay=0.0, quantizer=None, **options):
    """The paper's model, small (with quantiser ``options`` on top; or a whole ``quantizer``), in float64."""
    mv.manual_seed(0)
    quantizer = quantizer if quantizer is not None else mv.models.QuantizerOptions(**options)
    return mv.models.VQVAE(num_hiddens=8, num_residual_hiddens=4, num_residual_layers=2, embedding_dim=3,
                           num_embeddings=10, decay=decay, quantizer=quantizer).double()


def recorded_step(model, trace=True):
    x = mv.tensor(np.random.default_rng(2).uniform(-0.5, 0.5, (2, 1, 8, 8)))
    with (mv.graph.trace(model) if trace else contextlib.nullcontext()):
        x_recon, vq = model(x)
    loss = F.mse_loss(x_recon, x) * 12 + vq.loss
    vq.quantized.retain_grad()
    with mv.graph.record_grad_norms():
        loss.backward()
    return loss, x_recon, vq


def test_the_model_names_its_tensors_and_vqoutput_exposes_z_q():
    model = tiny_model()
    loss, x_recon, vq = recorded_step(model)
    assert (vq.z_e.name, vq.z_q.name, vq.quantized.name, x_recon.name) == ("z_e", "z_q", "quantized", "x_recon")
    assert (vq.codebook_loss.name, vq.commitment_loss.name, vq.loss.name) == \
        ("codebook_loss", "commitment_loss", "vq_loss")
    assert vq.quantized.creator.inputs == [vq.z_e, vq.z_q]          # z_q: the estimator's second input
    np.testing.assert_array_equal(vq.z_q.data, model.vq.codebook.data[vq.indices].transpose(0, 3, 1, 2))
    with mv.no_grad():          # no graph: z_q is still there, with the codes' values
        _, plain = model(mv.tensor(np.zeros((1, 1, 8, 8))))
    np.testing.assert_array_equal(plain.z_q.data, plain.quantized.data)


def test_the_default_quantizer_names_its_tensors_too():
    """minivq's default quantiser (EMA codebook, cosine lookup in 8 dimensions): the estimator's output is
    ``quantized`` before project_out takes it back to D; the EMA codebook has no codebook loss in the graph."""
    from minivq.train import estimator_output
    model = tiny_model(decay=0.99, quantizer=mv.models.DEFAULT_QUANTIZER)
    loss, x_recon, vq = recorded_step(model)
    out = estimator_output(vq)
    assert (vq.z_e.name, vq.z_q.name, out.name, x_recon.name) == ("z_e", "z_q", "quantized", "x_recon")
    assert out.creator.name == "StraightThrough" and out.creator.inputs[1] is vq.z_q
    assert vq.quantized.creator.name == "Conv2d" and vq.quantized.creator.inputs[0] is out     # project_out
    assert vq.commitment_loss.name == "commitment_loss"
    # z_q: the chosen codes in the 8-dimensional search space, unit vectors (the step then updated the codebook)
    assert vq.z_q.shape == (2, 8, 2, 2)
    np.testing.assert_allclose(np.linalg.norm(vq.z_q.data, axis=1), 1.0, rtol=1e-12)
    names = {fn.name for fn in mv.graph.nodes(loss)}
    assert "StraightThrough" in names and "L2Normalize" in names


def test_format_graph_shows_names_and_what_each_input_received():
    model = tiny_model()
    loss, x_recon, vq = recorded_step(model)
    text = mv.graph.format_graph(loss, names=dict(model.named_parameters()))
    lines = {re.split(r"\s{2,}", line)[1]: re.split(r"\s{2,}", line) for line in text.splitlines()[1:]}
    # straight-through passes the decoder's gradient to z_e whole, and none to z_q
    passed = f"{np.linalg.norm(vq.quantized.grad):.4e}"
    assert lines["StraightThrough -> quantized"][-1] == \
        f"#{lines['Conv2d -> z_e'][0]} z_e: {passed}, #{lines['Transpose -> z_q'][0]} z_q: cut"
    cuts = sorted(line[-1] for line in (re.split(r"\s{2,}", l) for l in text.splitlines()[1:])
                  if line[1] == "StopGradient")
    assert cuts == [f"#{lines['Conv2d -> z_e'][0]} z_e: cut", f"#{lines['Transpose -> z_q'][0]} z_q: cut"]
    assert "Conv2d -> z_e" in lines and "ConvTranspose2d -> x_recon" in lines
    embedding = lines["Embedding"][-1]
    assert embedding.startswith("const(2, 2, 2): -, vq.codebook: ")      # the indices need no gradient
    # the codebook's gradient, as the graph saw it pass, is the gradient the codebook holds
    assert float(embedding.rsplit(": ", 1)[1]) == pytest.approx(np.linalg.norm(model.vq.codebook.grad), rel=1e-4)
    assert "encoder.conv_1.weight: " in text and "param(" not in text


def test_input_gradient_norms_are_the_gradients_each_input_received():
    """Through a small graph whose input gradients are known in closed form."""
    a = mv.tensor(np.array([1.0, -2.0, 3.0]), requires_grad=True)
    b = mv.tensor(np.array([0.5, 0.5, 2.0]), requires_grad=True)
    c = mv.tensor(np.array([4.0, 5.0, 6.0]))          # a constant
    y = (a * b + F.stop_gradient(b) * c).sum()
    with mv.graph.record_grad_norms():
        y.backward()
    fns = {fn.name: fn for fn in mv.graph.nodes(y)}
    mul = [fn for fn in mv.graph.nodes(y) if fn.name == "Mul" and fn.inputs[0] is a][0]
    assert mul.input_grad_norms == pytest.approx([np.linalg.norm(b.data), np.linalg.norm(a.data)])
    assert fns["StopGradient"].input_grad_norms == [None]
    assert mv.graph.input_state(fns["StopGradient"], 0) == ("cut", None)
    other = [fn for fn in mv.graph.nodes(y) if fn.name == "Mul" and fn.inputs[1] is c][0]
    assert mv.graph.input_state(other, 1) == ("const", None)
    np.testing.assert_allclose(a.grad, b.data)        # recording changes no gradient
    np.testing.assert_allclose(b.grad, a.data)


@pytest.mark.parametrize("decay,quantizer", [(0.0, mv.models.PAPER_QUANTIZER),
                                             (0.99, mv.models.DEFAULT_QUANTIZER)], ids=["paper", "default"])
def test_recording_changes_no_gradient_of_a_model(decay, quantizer):
    plain, recorded = tiny_model(decay, quantizer), tiny_model(decay, quantizer)
    x = mv.tensor(np.random.default_rng(2).uniform(-0.5, 0.5, (2, 1, 8, 8)))
    for model, record in ((plain, False), (recorded, True)):
        x_recon, vq = model(x)
        loss = F.mse_loss(x_recon, x) + vq.loss
        with (mv.graph.record_grad_norms() if record else contextlib.nullcontext()):
            loss.backward()
    for (name, p), (_, q) in zip(plain.named_parameters(), recorded.named_parameters()):
        np.testing.assert_array_equal(p.grad, q.grad, err_msg=name)


def test_trace_notes_the_module_that_made_each_node_and_leaves_no_wrapper():
    model = tiny_model()
    loss, x_recon, vq = recorded_step(model)
    scopes = {getattr(fn, "scope", None) for fn in mv.graph.nodes(loss)}
    assert {"encoder.conv_1", "encoder", "encoder.residual_stack.layers.0.block.1", "vq", "decoder.conv_trans_2",
            None} <= scopes
    st = vq.quantized.creator
    assert st.scope == "vq" and st.scope_kinds == ("VectorQuantizer",)
    relu = x_recon.creator.inputs[0].creator       # conv_trans_2(relu(...)): the ReLU of Decoder.forward itself
    assert relu.name == "ReLU" and relu.scope == "decoder" and relu.scope_kinds == ("Decoder",)
    add = [fn for fn in mv.graph.nodes(loss) if fn.name == "Add"
           and getattr(fn, "scope", "") == "encoder.residual_stack.layers.1"]
    assert len(add) == 1 and add[0].scope_kinds == ("Encoder", "ResidualStack", "Sequential", "Residual")
    conv = model.decoder.conv_1
    assert "forward" not in conv.__dict__ and "forward" not in model.__dict__      # unwrapped after the block
    assert [getattr(fn, "scope", None) for fn in mv.graph.nodes(loss)][0] is None   # the loss: outside the model


def test_dot_colours_the_rotation_trick_too():
    model = tiny_model(estimator="rotation")
    loss, *_ = recorded_step(model)
    dot = mv.graph.to_dot(loss)
    for name in ("RotationTrick", "StopGradient"):
        line = [l for l in dot.splitlines() if f'label="{name}' in l][0]
        assert "fillcolor" in line and "bold" in line


def test_estimator_agreement_matches_the_rotation_formula():
    rng = np.random.default_rng(5)
    z_e, z_q, g = (rng.standard_normal((3, 4, 2, 2)) for _ in range(3))
    cosine, ratio = mv.graph.estimator_agreement(g, z_e, z_q)
    rotated = np.empty_like(g)
    for n in range(3):
        for i in range(2):
            for j in range(2):
                e, q = z_e[n, :, i, j], z_q[n, :, i, j]
                lam = np.linalg.norm(q) / np.linalg.norm(e)
                rotated[n, :, i, j] = lam * rotation_matrix(e, q).T @ g[n, :, i, j]
    assert ratio == pytest.approx(np.linalg.norm(rotated) / np.linalg.norm(g), rel=1e-10)
    assert cosine == pytest.approx((rotated * g).sum() / np.linalg.norm(rotated) / np.linalg.norm(g), rel=1e-10)
    same = z_e * 2.0                # codes along the encoder outputs: no rotation, scale 2
    assert mv.graph.estimator_agreement(g, z_e, same) == pytest.approx((1.0, 2.0))
