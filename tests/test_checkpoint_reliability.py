"""Checkpoints that must not be misread: the optimizer class travels with its state dict,
corrupt files raise one error type with nothing changed, and files honour the umask and leave
no temporary files behind (issue 14, items 1, 3 and 10)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import netcl_optim as no
from netcl_optim import stateful as S
from netcl_optim._checkpoint import load, save


def dev(x: Any, queue: Any) -> Any:
    return no.to_device(np.asarray(x, np.float32), queue)


def stepped(cls: str, queue: Any, **kwargs: Any) -> Any:
    """An optimizer of class ``cls`` over two parameters, after one step."""
    params = [S.Parameter(dev(np.full(s, 0.5), queue)) for s in ((2,), (3,))]
    opt = getattr(S, cls)(params, **kwargs)
    for p in params:
        p.grad = dev(np.ones(p.data.shape), queue)
    opt.step()
    return opt


def snapshot(opt: Any) -> tuple[Any, dict[int, dict[str, bytes]]]:
    sd = opt.state_dict()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    state = {
        i: {k: (v.tobytes() if isinstance(v, np.ndarray) else v) for k, v in s.items()}
        for i, s in sd["state"].items()
    }
    return groups, state


# ---------------------------------------------------------------------------- item 1: class


ALIKE = [("AdamW", "Adam"), ("Adam", "AdamW"), ("Momentum", "SGD"), ("SGD", "Momentum"),
         ("RMSProp", "SGD"), ("Adam", "RMSProp")]  # fmt: skip


@pytest.mark.parametrize(("saved", "target"), ALIKE, ids=[f"{a}-into-{b}" for a, b in ALIKE])
def test_checkpoint_of_another_class_is_refused(cl_queue, tmp_path, saved, target):
    """An AdamW checkpoint loaded into an Adam (and every such pair) raises, naming both
    classes, instead of silently switching decoupled to coupled weight decay."""
    path = tmp_path / "opt.npz"
    save(path, stepped(saved, cl_queue, lr=0.1))
    opt = stepped(target, cl_queue, lr=0.2)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=rf"\b{saved}'s.*\b{target}'s"):
        load(path, opt)
    assert snapshot(opt) == before


def test_empty_state_of_another_class_is_refused(cl_queue):
    """Before any step the state is empty: the class marker still tells them apart."""
    params = [S.Parameter(dev(np.ones(2), cl_queue))]
    sd = S.AdamW(params).state_dict()
    assert sd["state"] == {}
    opt = S.Adam([S.Parameter(dev(np.ones(2), cl_queue))], lr=0.3)
    with pytest.raises(ValueError, match=r"AdamW's.*Adam's"):
        opt.load_state_dict(sd)
    assert opt.lr == 0.3


def test_state_dict_names_its_class(cl_queue):
    """The class is recorded, and Adam/AdamW carry torch's decoupled_weight_decay flag."""
    for cls, flag in (("Adam", False), ("AdamW", True), ("SGD", None), ("RMSProp", None)):
        sd = stepped(cls, cl_queue).state_dict()
        assert sd["optimizer"] == cls
        assert sd["param_groups"][0].get("decoupled_weight_decay") == flag
        opt = stepped(cls, cl_queue)
        opt.load_state_dict(sd)  # its own class loads
        assert "decoupled_weight_decay" not in opt.param_groups[0]


def test_invalid_class_marker_is_refused(cl_queue):
    opt = stepped("Adam", cl_queue)
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="optimizer"):
        opt.load_state_dict({**sd, "optimizer": 3})


def _torch_state_dict(torch: Any, name: str, step: bool, **hyper: Any) -> dict[str, Any]:
    tp = [torch.nn.Parameter(torch.full((2,), 0.5)), torch.nn.Parameter(torch.full((3,), 0.5))]
    topt = getattr(torch.optim, name)(tp, **hyper)
    if step:
        for p in tp:
            p.grad = torch.ones_like(p)
        topt.step()
    sd = topt.state_dict()
    return {
        "state": {
            k: {n: (v.numpy() if torch.is_tensor(v) else v) for n, v in s.items()}
            for k, s in sd["state"].items()
        },
        "param_groups": sd["param_groups"],
    }


TORCH_FOREIGN = [
    ("AdamW", {}, "Adam", r"AdamW's.*\bAdam's"),
    ("Adam", {}, "AdamW", r"\bAdam's.*AdamW's"),
    ("SGD", {"momentum": 0.9, "dampening": 0.5}, "Momentum", r"SGD.*Momentum|Momentum.*SGD"),
    ("Adam", {}, "SGD", r"Adam.*SGD's"),
    ("RMSprop", {}, "Adam", r"RMSProp.*\bAdam's"),
    ("SGD", {"momentum": 0.9}, "RMSProp", r"SGD.*RMSProp's"),
]


@pytest.mark.parametrize("step", [False, True], ids=["fresh", "stepped"])
@pytest.mark.parametrize(("tname", "hyper", "target", "match"), TORCH_FOREIGN,
                         ids=[f"torch{t[0]}-into-{t[2]}" for t in TORCH_FOREIGN])  # fmt: skip
def test_torch_state_dict_of_another_class_is_refused(cl_queue, tname, hyper, target, match,
                                                      step):  # fmt: skip
    torch = pytest.importorskip("torch")
    sd = _torch_state_dict(torch, tname, step, lr=0.1, **hyper)
    opt = stepped(target, cl_queue, lr=0.2)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert snapshot(opt) == before


@pytest.mark.parametrize(("tname", "target", "hyper"), [
    ("Adam", "Adam", {"weight_decay": 0.1}), ("AdamW", "AdamW", {}),
    ("SGD", "SGD", {"momentum": 0.9, "dampening": 0.5}), ("SGD", "Momentum", {"momentum": 0.9}),
    ("RMSprop", "RMSProp", {"momentum": 0.9, "centered": True}),
])  # fmt: skip
def test_torch_state_dict_of_the_matching_class_loads(cl_queue, tname, target, hyper):
    torch = pytest.importorskip("torch")
    sd = _torch_state_dict(torch, tname, True, lr=0.1, **hyper)
    opt = stepped(target, cl_queue, lr=0.2)
    opt.load_state_dict(sd)
    assert opt.lr == 0.1
    assert opt.state_dict()["state"][0].keys() == sd["state"][0].keys()


def test_our_state_dict_loads_into_torch_with_its_flag(cl_queue):
    """The class marker is ignored by torch, and torch keeps AdamW's decoupled flag."""
    torch = pytest.importorskip("torch")
    sd = stepped("AdamW", cl_queue, lr=0.1).state_dict()
    tp = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    topt = torch.optim.AdamW(tp, lr=1.0)
    topt.load_state_dict(
        {
            **sd,
            "state": {
                k: {n: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v)
                    for n, v in s.items()}
                for k, s in sd["state"].items()
            },
        }
    )  # fmt: skip
    assert topt.param_groups[0]["decoupled_weight_decay"] is True
    assert topt.param_groups[0]["lr"] == 0.1


# ---------------------------------------------------------------------------- item 3: corrupt


def _rewrite(src: Path, dst: Path, edit: Any) -> None:
    """Copy the .npz ``src`` to ``dst`` with ``edit(name, bytes) -> bytes | None`` applied to
    each entry (``None`` drops it)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info, data)


def _tree_entry(meta_bytes: bytes) -> bytes:
    """The bytes of a ``__tree__.npy`` entry holding ``meta_bytes``."""
    import io

    buf = io.BytesIO()
    np.save(buf, np.frombuffer(meta_bytes, dtype=np.uint8))
    return buf.getvalue()


def _with_tree(text: bytes):
    return lambda name, data: _tree_entry(text) if name == "__tree__.npy" else data


def _corrupt_files(good: Path, tmp: Path) -> dict[str, Path]:
    raw = good.read_bytes()
    files = {
        "empty": b"",
        "truncated": raw[: len(raw) // 2],
        "random": np.random.default_rng(0).bytes(300),
        "text": b"hello, this is not a checkpoint\n",
        "pickle": b"\x80\x04\x95" + bytes(40),
    }
    out = {}
    for name, data in files.items():
        out[name] = tmp / f"{name}.npz"
        out[name].write_bytes(data)
    out["npy"] = tmp / "single.npy"
    np.save(out["npy"], np.ones(3))
    edits = {
        "no-array": lambda name, data: None if name == "a0.npy" else data,
        "no-tree": lambda name, data: None if name == "__tree__.npy" else data,
        "bad-utf8": _with_tree(b"\xff\xfe{"),
        "bad-json": _with_tree(b'{"format": '),
        "no-kind": _with_tree(b'{"format": "netcl_optim.checkpoint/1", "tree": 1}'),
        "bad-kind": _with_tree(b'{"format": "netcl_optim.checkpoint/1", "kind": "x", "tree": 1}'),
        "no-tree-node": _with_tree(b'{"format": "netcl_optim.checkpoint/1", "kind": "pytree"}'),
        "not-object": _with_tree(b"[1, 2]"),
        "bad-node": _with_tree(
            b'{"format": "netcl_optim.checkpoint/1", "kind": "pytree", "tree": {"dict": 5}}'
        ),
        "bad-array-ref": _with_tree(
            b'{"format": "netcl_optim.checkpoint/1", "kind": "pytree", "tree": {"device": 7}}'
        ),
        "bad-entry": lambda name, data: data[:20] if name == "a0.npy" else data,
    }
    for name, edit in edits.items():
        out[name] = tmp / f"{name}.npz"
        _rewrite(good, out[name], edit)
    return out


def test_corrupt_checkpoints_raise_checkpoint_error(cl_queue, tmp_path):
    """Every kind of broken file raises no.CheckpointError (a ValueError) naming the path,
    with the cause chained, and the optimizer it was to be loaded into is unchanged."""
    assert issubclass(no.CheckpointError, ValueError)
    assert "CheckpointError" in no.__all__
    opt = stepped("Adam", cl_queue, lr=0.1)
    good = tmp_path / "good.npz"
    save(good, opt)
    before = snapshot(opt)
    for what, path in _corrupt_files(good, tmp_path).items():
        for target in (None, opt):
            with pytest.raises(no.CheckpointError) as info:
                load(path, target)
            err = info.value
            assert str(path) in str(err), what
            assert "not a netcl_optim checkpoint" in str(err), what
            assert err.path == str(path)
            if what in ("truncated", "bad-utf8", "bad-json", "bad-entry"):
                assert err.__cause__ is not None, what  # what numpy, zipfile or json raised
        assert snapshot(opt) == before, what
    load(good, opt)  # the good file still loads


def test_corrupt_pytree_checkpoints_raise_checkpoint_error(cl_queue, tmp_path):
    good = tmp_path / "tree.npz"
    save(good, {"p": [dev(np.ones(3), cl_queue)], "n": 3})
    for what, path in _corrupt_files(good, tmp_path).items():
        with pytest.raises(no.CheckpointError, match="not a netcl_optim checkpoint"):
            load(path, queue=cl_queue)
        del what


def test_state_dict_checkpoint_that_is_not_a_state_dict(cl_queue, tmp_path):
    """kind "state_dict" around a tree that is no state dict: the file is inconsistent."""
    good = tmp_path / "opt.npz"
    save(good, stepped("SGD", cl_queue, momentum=0.9))
    bad = tmp_path / "bad.npz"
    text = b'{"format": "netcl_optim.checkpoint/1", "kind": "state_dict", "tree": {"list": []}}'
    _rewrite(good, bad, _with_tree(text))
    opt = stepped("SGD", cl_queue, momentum=0.9)
    before = snapshot(opt)
    with pytest.raises(no.CheckpointError):
        load(bad, opt)
    assert snapshot(opt) == before


def test_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "absent.npz")


def test_malformed_state_dicts_raise_value_error(cl_queue):
    """In memory too: wrong container types are ValueErrors naming the key, nothing changed."""
    opt = stepped("Adam", cl_queue, lr=0.1)
    good = opt.state_dict()
    before = snapshot(opt)
    bad = [
        {**good, "state": 5},
        {**good, "param_groups": 5},
        {**good, "param_groups": [{**good["param_groups"][0], "params": 5}]},
        {**good, "state": [(0, 1)]},
    ]
    for sd in bad:
        with pytest.raises(ValueError):
            opt.load_state_dict(sd)
    assert snapshot(opt) == before


def test_checkpoint_error_pickles():
    import pickle

    err = no.CheckpointError("/x/y.npz", "it is empty")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is no.CheckpointError and str(back) == str(err) and back.path == "/x/y.npz"


# ---------------------------------------------------------------------------- item 10: files


@pytest.fixture
def umask():
    old = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_new_checkpoint_honours_the_umask(tmp_path, umask, mask):
    umask(mask)
    path = tmp_path / "ckpt.npz"
    save(path, {"a": np.arange(3.0)})
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o600, 0o444])
def test_overwriting_keeps_the_old_mode(tmp_path, umask, mode):
    umask(0o077)
    path = tmp_path / "ckpt.npz"
    path.write_bytes(b"old")
    path.chmod(mode)
    save(path, {"a": np.arange(3.0)})
    assert stat.S_IMODE(path.stat().st_mode) == mode
    np.testing.assert_array_equal(load(path)["a"], np.arange(3.0))


_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from netcl_optim._checkpoint import save

    real_fsync = os.fsync

    def fsync(fd):
        if sys.argv[2] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        print("writing", flush=True)
        sys.stdin.readline()
        os.fsync = real_fsync
        real_fsync(fd)

    os.fsync = fsync
    save(sys.argv[1], {"who": "child"})
    print("saved", flush=True)
    """
)


def _child(path: Path, how: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), how],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_stale_temporary_files_of_a_killed_save_are_removed(tmp_path):
    path = tmp_path / "ckpt.npz"
    save(path, {"who": "first"})
    child = _child(path, "kill")
    child.communicate(timeout=120)
    assert child.returncode == -9
    left = sorted(os.listdir(tmp_path))
    assert len(left) == 2 and left[1] == "ckpt.npz"  # the killed save's temporary file
    other = tmp_path / "other.npz"
    save(other, {"who": "other"})
    assert len(os.listdir(tmp_path)) == 3  # another target's save leaves it alone
    (tmp_path / ".ckpt.npz.notes.tmp").write_text("a user's file")
    save(path, {"who": "second"})
    assert sorted(os.listdir(tmp_path)) == [".ckpt.npz.notes.tmp", "ckpt.npz", "other.npz"]
    assert load(path) == {"who": "second"}


def test_a_concurrent_save_keeps_its_temporary_file(tmp_path):
    """A save in progress in another process is not mistaken for a stale one."""
    path = tmp_path / "ckpt.npz"
    child = _child(path, "pause")
    assert child.stdout is not None and child.stdin is not None
    assert child.stdout.readline() == "writing\n"
    try:
        save(path, {"who": "parent"})
        assert len(os.listdir(tmp_path)) == 2  # ckpt.npz and the child's temporary file
    finally:
        out, _ = child.communicate("go\n", timeout=120)
    assert child.returncode == 0 and out == "saved\n"
    assert load(path) == {"who": "child"}
    assert os.listdir(tmp_path) == ["ckpt.npz"]
