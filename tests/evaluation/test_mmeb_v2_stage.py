"""The eval_mmeb_v2 stage end to end, as the README runs it (configs/mmeb.py on a tiny
checkpoint and the generated mini-MMEB-V2, host work in a worker): each task's score equals a
hand computation from the Embedder's vectors of each input alone."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from g2e.data import mmeb_v2
from g2e.data.preprocess import EmbedItem
from g2e.demo import mini_mmeb_v2
from g2e.embedding import Embedder
from g2e.evaluation import mmeb_v2 as evaluation
from tests import assets

SETTINGS = (
    "--config.data.image_resolution=processor",
    "--config.data.max_length=256",
    "--config.data.length_buckets=(128,256)",
    "--config.data.patch_buckets=(0,64,128)",
    "--config.data.video_frames=4",
    "--config.model.dtype=float32",
    "--config.model.param_dtype=float32",
    "--config.eval.batch_size=4",
    "--config.data.workers=1",
)


def test_eval_mmeb_v2_runs_from_the_command_line_and_equals_a_hand_computation(tmp_path):
    _, checkpoint = assets.tiny_checkpoint(tmp_path / "model", seed=4)
    data_dir = tmp_path / "v2"
    mini_mmeb_v2.write(data_dir, seed=1, queries_per_task=4)
    work = tmp_path / "work"
    command = [
        sys.executable,
        "-m",
        "g2e.main",
        "--config=configs/mmeb.py",
        "--config.stages=eval_mmeb_v2",
        f"--config.model_dir={checkpoint}",
        f"--config.data.mmeb_v2_dir={data_dir}",
        f"--config.workdir={work}",
        *SETTINGS,
    ]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((work / "eval_mmeb_v2" / "results.json").read_text())
    assert list(results["tasks"]) == list(mini_mmeb_v2.TASK_NAMES)
    assert set(results["modalities"]) == {"image", "video", "visdoc"}
    for task, host in results["host"].items():
        assert host["items_in_main"] == 0 and host["items_in_workers"] > 0, (task, host)

    # By hand: every input embedded alone, ranked by cosine with numpy.
    embedder = Embedder.from_pretrained(
        checkpoint,
        **{
            "data.image_resolution": "processor",
            "data.max_length": 256,
            "data.length_buckets": (128, 256),
            "data.patch_buckets": (0, 64, 128),
            "data.video_frames": 4,
            "data.workers": 0,
            "model.dtype": "float32",
            "model.param_dtype": "float32",
        },
    )
    reader = mmeb_v2.Reader(data_dir)
    for name in mini_mmeb_v2.TASK_NAMES:
        data = reader.read(mmeb_v2.task(name))

        def alone(item, role):
            extra = {"video": item.video} if item.video else {}
            vector = embedder([EmbedItem(item.text, item.image, role, name, **extra)])[0]
            return vector / np.linalg.norm(vector)

        pool = {n: alone(c, "candidate") for n, c in data.pool.items()}
        hits, ndcgs = [], []
        for number, (query, gains) in enumerate(zip(data.queries, data.relevance)):
            names = data.candidates[number] if data.candidates else list(pool)
            q = alone(query, "query")
            scores = [float(q @ pool[n]) for n in names]
            ranked = [names[i] for i in sorted(range(len(names)), key=lambda i: -scores[i])]
            hit, ndcg = evaluation.query_metrics(ranked, gains)
            hits.append(hit)
            ndcgs.append(ndcg)
        expected = np.mean(ndcgs if name == "ViDoRe_docvqa" else hits) * 100
        assert results["tasks"][name]["score"] == pytest.approx(expected, abs=1e-6), name
    embedder.close()
