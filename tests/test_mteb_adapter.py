"""g2e.mteb_adapter.MTEBEncoder under the installed mteb package: it satisfies MTEB's
EncoderProtocol, and mteb.evaluate runs a tiny text-to-image retrieval task built here (no
download) on a tiny checkpoint; every query-document score MTEB records equals the cosine of
g2e's own embeddings: queries in the query role with the task's instruction, documents (images)
in the candidate role. MTEB 1.x's call (a list of strings and task_name) works too."""

from __future__ import annotations

import json

import mteb  # the `mteb` extra; the `test` extra installs it
import numpy as np
import pytest

from g2e import Embedder
from g2e.mteb_adapter import MTEBEncoder
from tests import assets

INSTRUCTION = "Find me an everyday image that matches the given caption"
QUERIES = ["a red circle", "two blue squares", "a green star"]


def tiny_task():
    """A text-to-image retrieval task whose data is built here (3 queries, 4 images)."""
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata

    images = [assets.noise_image(56 + 28 * (i % 2), 84, seed=20 + i) for i in range(4)]

    class TinyT2I(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name="G2ETinyT2IRetrieval",
            dataset={"path": "g2e/tiny-t2i", "revision": "0"},
            description="A tiny text-to-image retrieval task built by g2e's tests.",
            reference=None,
            type="Any2AnyRetrieval",
            category="t2i",
            modalities=["text", "image"],
            eval_splits=["test"],
            eval_langs=["eng-Latn"],
            main_score="ndcg_at_10",
            date=("2026-01-01", "2026-01-02"),
            domains=["Encyclopaedic"],
            task_subtypes=["Image Text Retrieval"],
            license="cc-by-4.0",
            annotations_creators="derived",
            dialect=[],
            sample_creation="created",
            bibtex_citation="",
            prompt={"query": INSTRUCTION},
        )

        def load_data(self, **kwargs):
            corpus = Dataset.from_dict({"id": [f"d{i}" for i in range(4)], "image": images})
            queries = Dataset.from_dict({"id": [f"q{i}" for i in range(3)], "text": QUERIES})
            relevant = {f"q{i}": {f"d{i}": 1} for i in range(3)}
            self.dataset = {
                "default": {
                    "test": {
                        "corpus": corpus,
                        "queries": queries,
                        "relevant_docs": relevant,
                        "top_ranked": None,
                    }
                }
            }
            self.data_loaded = True

    return TinyT2I(), images


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    _, checkpoint = assets.tiny_checkpoint(tmp_path_factory.mktemp("mteb_ckpt"), seed=6)
    return Embedder.from_pretrained(checkpoint, **{"eval.batch_size": 1})


def test_the_adapter_is_an_mteb_encoder(embedder):
    from mteb.models.models_protocols import EncoderProtocol

    model = MTEBEncoder(embedder, name="g2e/tiny")
    assert isinstance(model, EncoderProtocol)
    assert model.mteb_model_meta.name == "g2e/tiny"


def test_mteb_scores_are_g2e_cosines(embedder, tmp_path):
    task, images = tiny_task()
    model = MTEBEncoder(embedder, name="g2e/tiny")
    result = mteb.evaluate(
        model,
        task,
        cache=None,
        prediction_folder=tmp_path,
        encode_kwargs={"batch_size": 8, "show_progress_bar": False},
        show_progress_bar=False,
    )
    scores = result.task_results[0].scores["test"][0]
    assert 0.0 <= scores["ndcg_at_10"] <= 1.0
    predictions = json.loads(next(tmp_path.glob("*predictions*.json")).read_text())
    recorded = predictions["default"]["test"]
    queries = embedder.encode(QUERIES, prompt_name="query", prompt=f"{INSTRUCTION}: ")
    documents = embedder.encode(images, prompt_name="document")
    expected = queries @ documents.T
    for q in range(len(QUERIES)):
        for d in range(len(images)):
            assert recorded[f"q{q}"][f"d{d}"] == pytest.approx(expected[q, d], abs=1e-5)


def test_the_mteb_1_call_embeds_a_list_of_strings(embedder):
    model = MTEBEncoder(embedder, instructions={"MyTask": "Represent the sentence"})
    vectors = model.encode(QUERIES, task_name="MyTask", prompt_type="query")
    np.testing.assert_allclose(
        vectors,
        embedder.encode(QUERIES, role="query", prompt="Represent the sentence: "),
        atol=1e-6,
        rtol=0,
    )
    similarity = model.similarity(vectors, vectors)
    np.testing.assert_allclose(np.diag(similarity), 1.0, atol=1e-5)
    np.testing.assert_allclose(model.similarity_pairwise(vectors, vectors), 1.0, atol=1e-5)
