"""Module: parameter discovery in registration order, state dicts, modes, devices."""
import numpy as np
import pytest

import minivq as mv
from minivq import nn


class Affine(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(np.full((n,), 2.0, np.float32))
        self.bias = nn.Parameter(np.zeros((n,), np.float32))
        self.register_buffer("calls", np.zeros((), np.int64))

    def forward(self, x):
        return x * self.weight + self.bias


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = Affine(3)
        self.body = nn.Sequential(Affine(3), nn.ReLU(), Affine(3))
        self.scale = nn.Parameter(np.ones((1,), np.float32))

    def forward(self, x):
        return self.body(self.first(x)) * self.scale


def test_parameters_in_registration_order():
    names = [n for n, _ in Net().named_parameters()]
    assert names == ["scale", "first.weight", "first.bias", "body.0.weight", "body.0.bias",
                     "body.2.weight", "body.2.bias"]
    # own parameters come first (PyTorch's order); parameters() is the same list, object for object
    net = Net()
    assert [id(p) for p in net.parameters()] == [id(p) for _, p in net.named_parameters()]
    assert list(net.state_dict())[:2] == ["scale", "first.weight"]


def test_registration_order_is_neither_by_name_nor_by_creation():
    """Parameters created in one order and registered in another, under shuffled names: the order is the
    registration order, which a set, a sort by name or a sort by id() would each lose."""
    gen = np.random.default_rng(0)
    created = [nn.Parameter(np.full((1,), float(i), np.float32)) for i in range(40)]
    order = [int(i) for i in gen.permutation(40)]
    names = [f"p{int(i)}" for i in gen.permutation(40)]
    assert names != sorted(names) and order != sorted(order)
    module = nn.Module()
    for name, i in zip(names, order):
        setattr(module, name, created[i])
    assert [n for n, _ in module.named_parameters()] == names
    assert [float(p.data[0]) for p in module.parameters()] == [float(i) for i in order]
    assert list(module.state_dict()) == names


def test_shared_parameter_listed_once():
    a = Affine(2)
    seq = nn.Sequential(a, a)
    assert len(seq.parameters()) == 2


def test_state_dict_round_trip_and_errors():
    net, other = Net(), Net()
    for p in net.parameters():
        p.data = p.data + 1.5
    state = net.state_dict()
    assert "first.calls" in state and "body.2.bias" in state
    other.load_state_dict(state)
    for (n1, p1), (n2, p2) in zip(net.named_parameters(), other.named_parameters()):
        np.testing.assert_array_equal(p1.data, p2.data)
        assert p2.data is not p1.data
    bad = dict(state)
    del bad["scale"]
    bad["extra"] = np.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \['scale'\].*unexpected keys \['extra'\]"):
        other.load_state_dict(bad)
    wrong = dict(state, scale=np.zeros(2))
    with pytest.raises(ValueError, match=r"'scale' has shape \(2,\), the model expects \(1,\)"):
        other.load_state_dict(wrong)


def test_train_eval_and_zero_grad():
    net = Net()
    assert net.training and net.body[0].training
    net.eval()
    assert not net.training and not net.body[2].training
    net.train()
    out = net(mv.tensor(np.ones((4, 3), np.float32)))
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    net.zero_grad()
    assert all(p.grad is None for p in net.parameters())


def test_assignment_rules():
    net = Net()
    with pytest.raises(TypeError, match="holds a Parameter"):
        net.scale = np.ones(1)
    net.first.calls = np.ones((), np.int64)
    assert net.state_dict()["first.calls"] == 1
    assert "Sequential" in repr(net)


def test_to_cpu_is_a_no_op_and_bad_device_is_named():
    net = Net()
    assert net.to("cpu") is net
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        net.to("tpu")


def test_module_without_super_init_is_named():
    class Broken(nn.Module):
        def __init__(self):
            self.w = 1

    with pytest.raises(RuntimeError, match="super"):
        Broken()
