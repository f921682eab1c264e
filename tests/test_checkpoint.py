import argparse
import os

import numpy as np
import pytest
import torch

from robuq.core.files import save_tensors
from robuq.models.checkpoint import CheckpointError, infer_config, load_dit, read_state_dict
from robuq.models.dit import DiT, create_dit

from conftest import tensor_byte_offset, tiny_config


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_robuq_file_round_trip(tmp_path, tiny_dit):
    path = save_tensors(tmp_path / "m.safetensors", tiny_dit.state_dict(), {"model_config": tiny_dit.config.to_dict()})
    loaded = load_dit(path)
    assert loaded.config == tiny_dit.config
    assert _same_weights(loaded, tiny_dit)


def test_reference_plain_state_dict(tmp_path, tiny_dit):
    path = tmp_path / "ref.pt"
    torch.save(tiny_dit.state_dict(), path)
    loaded = load_dit(path, config=tiny_dit.config)
    assert _same_weights(loaded, tiny_dit)


def test_reference_training_checkpoint_with_args_namespace(tmp_path, tiny_dit):
    other = DiT(tiny_dit.config)
    path = tmp_path / "0400000.pt"
    torch.save(
        {
            "model": other.state_dict(),
            "ema": tiny_dit.state_dict(),
            "opt": {},
            "args": argparse.Namespace(model="DiT-XL/2"),
        },
        path,
    )
    assert _same_weights(load_dit(path, config=tiny_dit.config), tiny_dit)  # EMA preferred, as DiT's sample.py does
    assert _same_weights(load_dit(path, config=tiny_dit.config, prefer="model"), other)


def test_config_inferred_from_shapes(tiny_dit):
    inferred = infer_config(tiny_dit.state_dict())
    assert (inferred.hidden_size, inferred.depth, inferred.patch_size, inferred.input_size) == (48, 2, 2, 8)
    assert inferred.num_classes == 10 and inferred.learn_sigma and inferred.in_channels == 1
    xl = infer_config({k: v for k, v in create_dit("DiT-S/4", input_size=16).state_dict().items()})
    assert xl.num_heads == 6 and xl.patch_size == 4 and xl.input_size == 16


def test_ddp_prefixes_are_stripped(tmp_path, tiny_dit):
    path = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in tiny_dit.state_dict().items()}, path)
    assert _same_weights(load_dit(path, config=tiny_dit.config), tiny_dit)


def test_missing_keys_are_named(tmp_path, tiny_dit):
    state = tiny_dit.state_dict()
    del state["blocks.1.mlp.fc2.weight"]
    torch.save(state, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.1\.mlp\.fc2\.weight"):
        load_dit(tmp_path / "m.pt", config=tiny_dit.config)


def test_shape_mismatch_with_config_is_named(tmp_path, tiny_dit):
    torch.save(tiny_dit.state_dict(), tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="shape mismatches: pos_embed"):
        load_dit(tmp_path / "m.pt", config=tiny_config(input_size=16))


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    rng = np.random.default_rng(0)
    for size in [256] * 40 + [1, 7, 4096]:  # garbage makes the unpickler fail in many ways; each is bad input
        path.write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        with pytest.raises(CheckpointError, match="not a model file|cannot be loaded safely|empty|truncated"):
            load_dit(path)


def test_truncated_checkpoint(tmp_path, tiny_dit):
    for name, save in (
        ("m.pt", lambda p: torch.save(tiny_dit.state_dict(), p)),
        ("m.safetensors", lambda p: save_tensors(p, tiny_dit.state_dict())),
    ):
        path = tmp_path / name
        save(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            load_dit(path)


def test_arbitrary_pickles_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, path)
    with pytest.raises(CheckpointError, match="cannot be loaded safely") as info:
        read_state_dict(path)
    message = str(info.value)  # names what was refused, and never passes on advice to load the file unsafely
    assert "system" in message and "weights_only" not in message and "allowlist" not in message


def test_a_text_file_is_named_as_not_a_model_file(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello\n")
    with pytest.raises(CheckpointError, match=r"notes.pt is not a model file: .*starts with b'hello"):
        read_state_dict(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_dit(tmp_path / "nope.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty"):
        load_dit(tmp_path / "empty.pt")


def test_dict_without_weights(tmp_path):
    torch.save({"step": torch.tensor(3), "note": "hi"}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="holds no state_dict"):
        read_state_dict(tmp_path / "x.pt")


def test_atomic_write_makes_ordinary_files_without_touching_the_umask(tmp_path, monkeypatch):
    import os

    from robuq.core.files import atomic_write_text, save_tensors

    calls = []
    real_umask = os.umask
    previous = real_umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or real_umask(mask))
        path = atomic_write_text(tmp_path / "out" / "a.json", "{}\n")
        # safetensors writes through a 0600 file of its own, renamed over robuq's temporary file
        tensors = save_tensors(tmp_path / "out" / "b.safetensors", {"w": torch.zeros(3)})
    finally:
        monkeypatch.undo()
        real_umask(previous)
    assert calls == []  # the umask was neither read nor changed
    for written in (path, tensors):
        assert (written.stat().st_mode & 0o777) == 0o640  # 0666 under the process's umask 027, as open() makes files
    assert path.read_text() == "{}\n" and sorted(p.name for p in path.parent.iterdir()) == ["a.json", "b.safetensors"]


def test_a_writer_killed_mid_write_leaves_no_temporary_file_once_the_next_write_starts(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from robuq.core.files import atomic_write_text, save_tensors

    folder = tmp_path / "checkpoints"
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time\n"
                "from robuq.core.files import atomic_write\n"
                "def write(tmp):\n"
                "    open(tmp, 'wb').write(b'partial')\n"
                "    print('writing', flush=True)\n"
                "    time.sleep(600)\n"
                f"atomic_write({str(folder / 'step-0000250.safetensors')!r}, write)\n"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout.readline().strip() == "writing"
        live_leftover = [p.name for p in folder.iterdir()]
        # A live writer's temporary file is not touched by another write in the folder.
        atomic_write_text(folder / "notes.txt", "x")
        assert set(live_leftover) <= {p.name for p in folder.iterdir()}
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
    time.sleep(0.05)
    assert len(live_leftover) == 1 and live_leftover[0].endswith(".tmp")
    save_tensors(folder / "step-0000275.safetensors", {"w": torch.zeros(2)})  # the resumed run's next checkpoint
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "step-0000275.safetensors"]


def test_a_changed_byte_inside_a_pytorch_checkpoint_fails_its_checksum(tmp_path, tiny_dit):
    path = tmp_path / "m.pt"
    torch.save(tiny_dit.state_dict(), path)
    data = bytearray(path.read_bytes())
    data[tensor_byte_offset(path)] ^= 0x40  # the first tensor's first byte, which torch.load would take as it is
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="fails its checksum"):
        load_dit(path)


def test_a_model_config_from_a_file_is_checked():
    from robuq.models.dit import DiTConfig

    with pytest.raises(ValueError, match="unknown model config fields: lean_sigma"):
        DiTConfig.from_dict({**tiny_config().to_dict(), "lean_sigma": True})
    with pytest.raises(ValueError, match="depth must be int"):
        DiTConfig.from_dict({**tiny_config().to_dict(), "depth": "2"})
    with pytest.raises(ValueError, match="multiple of num_heads"):
        DiTConfig.from_dict({**tiny_config().to_dict(), "num_heads": 5})


def test_load_dit_skips_the_random_initialisation_and_keeps_fp32(tmp_path, tiny_dit, monkeypatch):
    """The DiT is built as shapes and given the file's tensors (cast to its own dtype): no initialisation is
    computed only to be overwritten (seconds per process at XL/2)."""
    from robuq.core.files import save_tensors
    from robuq.models.dit import DiT

    half = {k: v.half() for k, v in tiny_dit.state_dict().items()}
    path = save_tensors(tmp_path / "half.safetensors", half, {"model_config": tiny_dit.config.to_dict()})
    on_meta = []  # where the model stood when its initialisation ran: shapes only, nothing computed
    monkeypatch.setattr(DiT, "initialize_weights", lambda self: on_meta.append(next(self.parameters()).is_meta))
    loaded = load_dit(path)
    assert on_meta == [True]
    assert all(p.dtype == torch.float32 and not p.is_meta for p in loaded.parameters())
    assert all(torch.equal(p, q.half().float()) for p, q in zip(loaded.parameters(), tiny_dit.parameters()))
