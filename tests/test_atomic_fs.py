"""study.search.atomic_fs: Tune's local storage written atomically. A writer killed mid-file leaves the
previous version (or nothing), never a truncated file: Tune's snapshot copy, killed with the driver, once
left a 0-byte searcher state that made `study resume` hang."""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap

import pyarrow.fs as pafs

from study.search.atomic_fs import atomic_local_fs

KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from study.search.atomic_fs import atomic_local_fs
    out = atomic_local_fs().open_output_stream(sys.argv[1])
    out.write(b"new" * 100_000)
    out.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # dies with the file half-written
""")


def test_a_writer_killed_mid_file_leaves_the_previous_version(tmp_path):
    dest = tmp_path / "searcher-state.pkl"
    dest.write_bytes(b"old, complete")
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(dest)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert dest.read_bytes() == b"old, complete"
    leftovers = [p.name for p in tmp_path.iterdir() if p != dest]
    assert len(leftovers) == 1 and leftovers[0].startswith(".searcher-state.pkl.")  # the hidden partial file


def test_a_folder_copied_the_way_tune_copies_it_arrives_whole(tmp_path):
    src = tmp_path / "staging"
    (src / "trial_0000" / "checkpoint_000001").mkdir(parents=True)
    files = {"experiment_state.json": b'{"trial_data": []}', "searcher-state.pkl": os.urandom(3 << 20),
             "trial_0000/checkpoint_000001/model.pt": os.urandom(1 << 20)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    fs = pickle.loads(pickle.dumps(atomic_local_fs()))  # Tune ships its storage context to the workers
    pafs.copy_files(str(src), str(tmp_path / "storage"), destination_filesystem=fs, chunk_size=1 << 20)
    for name, data in files.items():
        assert (tmp_path / "storage" / name).read_bytes() == data
    assert not [p for p in (tmp_path / "storage").rglob(".*")]  # no temporary file left behind
    fs.copy_file(str(src / "searcher-state.pkl"), str(tmp_path / "copy.pkl"))
    assert (tmp_path / "copy.pkl").read_bytes() == files["searcher-state.pkl"]
    assert fs.get_file_info(str(tmp_path / "copy.pkl")).size == 3 << 20
