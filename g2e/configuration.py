"""Every configuration key g2e reads, with its default, and the start-up validation.

Recipes in `configs/` start from `base_config()` and override what differs; `validate` runs
before any stage so a bad key fails in seconds with its name, not an hour into a run. The
allowed values of a key live here when the config defines them (dtypes, backprop modes, export
dtypes: the modules that implement them import them from here), and come from the module that
implements them when that module sits below the config (remat policies from the decoder, image
policies from the image loader, ...). Stage names come from g2e.layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections

from g2e import embedding_cache, hub, layout
from g2e.data import errors, images, mmeb_v2, rows
from g2e.models import attention, lora, sharding, text

# model.dtype / model.param_dtype.
DTYPES = ("float32", "bfloat16", "float16")
# train.backprop: 'auto' picks 'direct' when the step fits memory, else 'gradcache'.
BACKPROP = ("auto", "direct", "gradcache")
# export.dtype: 'source' keeps every tensor's dtype as the base checkpoint stores it.
EXPORT_DTYPES = ("source", *DTYPES)


def base_config() -> ml_collections.ConfigDict:
    """The defaults of every key; recipes override what they change."""
    c = ml_collections.ConfigDict()
    c.model_dir = ""  # a Hugging Face Qwen2-VL directory
    c.adapter_dir = ""  # optional PEFT LoRA/DoRA adapter applied on top of model_dir
    c.workdir = "workdir"
    c.stages = "eval_zero_shot,mine,train,eval,export"
    c.force = ""  # comma-separated stages to redo even if complete
    c.seed = 0
    # Embed command (configs/embed.py).
    c.input = ""
    c.output = ""
    c.distributed = ml_collections.ConfigDict(
        dict(coordinator_address="", num_processes=0, process_id=-1)
    )
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sharding_rules = sharding.DEFAULT_RULES
    c.model = _model_config()
    c.prompt = ml_collections.ConfigDict(dict(system=True, suffix=True))
    c.data = _data_config()
    # Items per device in one embedding step (x this process's batch devices), sized for an
    # 80 GB device at 2B with length and patch buckets up to 2048 tokens.
    c.eval = ml_collections.ConfigDict(dict(batch_size=32))
    # Embeddings of evaluation and mining are kept on disk in shards of this many items (a
    # killed stage resumes at the first missing shard), stored as float32 or float16.
    c.embedding_cache = ml_collections.ConfigDict(dict(shard_size=4096, dtype="float32"))
    c.mine = _mine_config()
    c.train = _train_config()
    # export.dtype: 'source' writes every tensor in the dtype the base checkpoint stores it in
    # (the merge itself is float32 either way); float32 / bfloat16 / float16 cast all of them.
    # push_to_hub: '' or a Hub id ORG/NAME that export uploads export/hf (with its model card)
    # to (g2e.hub.push_folder; HF_TOKEN must allow writing there).
    c.export = ml_collections.ConfigDict(dict(max_shard_mb=2000, dtype="source", push_to_hub=""))
    c.compilation_cache = _compilation_cache_config()
    c.demo = _demo_config()
    return c


def _model_config() -> ml_collections.ConfigDict:
    # attention: 'auto' picks per platform (cuDNN on a GPU in 16-bit, splash on a TPU where
    # lengths are multiples of 128, XLA otherwise: g2e.models.attention.resolve);
    # splash_block_q/kv: the splash kernel's tiles (multiples of 128).
    return ml_collections.ConfigDict(
        dict(
            dtype="bfloat16",
            param_dtype="bfloat16",
            remat="full",
            attention="auto",
            splash_block_q=512,
            splash_block_kv=512,
        )
    )


def _data_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            train_dir="",
            train_image_root="",
            train_subsets="",
            train_split="diverse_instruction",
            eval_dir="",
            eval_image_root="",
            eval_subsets="",
            # SugarCrepe and SugarCrepe++ (stage eval_sugarcrepe): folders of their
            # <category>.json files, and the folder of the COCO val2017 images they name.
            sugarcrepe_dir="",
            sugarcrepe_pp_dir="",
            sugarcrepe_image_root="",
            # MMEB-V2 (stage eval_mmeb_v2): the folder of its Hub snapshots (g2e/data/mmeb_v2.py
            # gives the layout) and the tasks to run: names and/or modalities (image, video,
            # visdoc), comma-separated; "" runs all 78 (or those a generated mini lists).
            mmeb_v2_dir="",
            mmeb_v2_tasks="",
            # 'parquet': the hub's layout in train_dir / eval_dir; 'tfds': the array_record copy
            # `python -m g2e.data.tfds_builders` wrote to tfds_dir (images inside, gs:// works).
            format="parquet",
            tfds_dir="",
            on_bad_input="error",
            # Processes that decode, resize and tokenise (Grain workers); -1: one per usable
            # core, 0: in the main process. Results do not depend on it.
            workers=-1,
            # Decode JPEGs at 1/2, 1/4 or 1/8 scale when the resolution policy shrinks them
            # that much anyway (far less host work for large photos and pages).
            jpeg_draft=True,
            max_length=2048,
            train_max_length=1024,
            # How images are pre-resized (docs/method.md §3): for evaluation, mining and the
            # embed command; train_image_resolution for training.
            image_resolution="random",
            train_image_resolution="mid_low",
            min_pixels=0,
            max_pixels=0,  # 0: the checkpoint's image processor settings
            # Frames sampled uniformly from each video input (g2e.data.videos); an odd count
            # is padded with the last frame (two frames make one temporal patch).
            video_frames=8,
            length_buckets=(128, 256, 512, 1024, 2048),
            # Embedding (eval, mine, embed, held-out checks) and training pack several inputs
            # into one row of this many tokens, each seeing only itself (g2e.data.batching.
            # pack_rows): far fewer padding slots, the same embeddings, loss and gradients.
            # 0: one input per row, padded to its length bucket. When set, at least
            # max_length and train_max_length.
            pack_length=0,
            # Patches per vision row of a packed batch: a packed batch's images lie in vision
            # rows of their own, several to a row, each attending within itself (0: rows as
            # wide as the patch bucket of the batch's largest input; a multiple of 4). Training packs its queries and
            # candidates into one pool and may take smaller vision rows that waste less.
            pack_patches=0,
            # 2048: a 640x480 photo under `random` has 1,564 patches (4096 would pay 2.6x).
            patch_buckets=(0, 1024, 2048, 4096, 16384),
            # Rows of each training subset that mining and training use (g2e.data.rows.
            # train_rows): 50k, VLM2Vec's convention (about 662k rows of MMEB's 1.07M); 0 keeps
            # every row, as the release does with SaHa (docs/method.md §3.1). row_sample_seed
            # -1 keeps the first rows in source order (`split[:cap]`); a seed >= 0 draws a
            # uniform sample instead, numpy default_rng([seed, crc32(subset name)]), kept in
            # source order.
            max_rows_per_subset=50000,
            row_sample_seed=-1,
            # The last rows of each training subset (after the cap) that mining and training
            # never see; the train stage reports retrieval accuracy on them every
            # train.heldout_every steps into train/train_metrics.jsonl. 0: none held out.
            heldout_rows=0,
        )
    )


def _mine_config() -> ml_collections.ConfigDict:
    # SaHa mining (docs/method.md §2; g2e.mining). `judge` is g2e's generative false-negative
    # check (off: the release's mining); owners it judges P(yes) > judge_threshold are dropped.
    return ml_collections.ConfigDict(
        dict(
            top_k=15,
            pool_mult=3,
            block_size=256,  # anchors searched at once; the judge speculates over one block
            batch_size=32,  # items per device in one embedding step, as eval.batch_size
            judge=True,
            judge_threshold=0.5,
            judge_batch_size=16,  # pairs per device in one judge step (two images a prompt)
        )
    )


def _train_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            steps=1500,
            lr=5e-5,
            warmup_steps=100,
            weight_decay=0.0,
            grad_clip=1.0,
            # Pairs per step whatever the device count (the release: 2048); each device takes
            # global_batch / devices rows, in clusters of cluster_size rows.
            global_batch=2048,
            cluster_size=16,
            # Rows that fall in no mined cluster: True trains them as single rows (g2e: no
            # training pair is lost); False drops them, as the release does (docs/method.md
            # §3.1). Training on random batches (train_random) uses every row either way.
            keep_unclustered_rows=True,
            # 'auto': backpropagate through the whole batch when XLA's memory plan of that step
            # fits memory_limit_gb (0: the device's own limit), else GradCache, and choose the
            # text decoder's remat policy with it, the least recomputation that fits
            # (g2e.training.step); 'direct' or 'gradcache' force one, with model.remat.
            # GradCache chunks are rows per device; 0 sizes them from the direct step's memory
            # per row. With data.pack_length the queries and candidates share one pool of
            # rows, chunked with query_chunk.
            backprop="auto",
            query_chunk=0,
            candidate_chunk=0,
            memory_limit_gb=0.0,
            # The frozen vision tower runs once per step, over this many rows per device at a
            # time, image rows first; chunks of text-only rows skip it (0: all rows at once).
            vision_chunk=16,
            temperature=0.02,
            # Mask candidates identical to a query's positive (same text and image) instead of
            # scoring them as negatives; False reproduces the release's loss exactly.
            mask_identical_positives=True,
            # Beyond the paper, off by default: logit + alpha * sg(sim) on negatives; mask
            # negatives scoring above the positive + margin (< 0: off); learn the temperature.
            hardness_alpha=0.0,
            false_negative_margin=-1.0,
            learnable_temperature=False,
            use_clusters=True,
            heldout_every=100,  # steps between held-out evaluations (data.heldout_rows > 0)
            checkpoint_every=100,
            keep_checkpoints=3,
            log_every=10,
            adapter=ml_collections.ConfigDict(
                dict(
                    kind="dora",
                    r=8,
                    alpha=64,
                    dropout=0.1,
                    targets=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"),
                )
            ),
        )
    )


def _compilation_cache_config() -> ml_collections.ConfigDict:
    # Persistent XLA compilation cache, shared by every stage and every rerun: a resume after a
    # preemption loads its compiled programs instead of compiling them again. dir '' means
    # <workdir>/compilation_cache. Programs that compiled faster than min_compile_time_secs, or
    # whose executable is smaller than min_entry_size_bytes, are not stored (JAX's thresholds:
    # jax_persistent_cache_min_compile_time_secs / _min_entry_size_bytes).
    return ml_collections.ConfigDict(
        dict(enabled=True, dir="", min_compile_time_secs=1.0, min_entry_size_bytes=0)
    )


def _demo_config() -> ml_collections.ConfigDict:
    # The demo's tiny generator (configs/demo.py): mini-MMEB size and model widths.
    return ml_collections.ConfigDict(
        dict(
            seed=0,
            # Mini-MMEB rows per training subset and queries per evaluation subset, both
            # multiplied by scale.
            train_rows=200,
            eval_queries=60,
            # Queries per task of the mini-MMEB-V2 (stage eval_mmeb_v2), also times scale.
            mmeb_v2_queries=24,
            scale=1.0,
            # 'asset': copy the committed pre-trained generator (g2e/demo/assets/generator, made
            # by `python -m g2e.demo.pretrain`); its widths are the ones below.
            # 'train': train one on the mini-MMEB's rows for generator_steps (CI's toy runs,
            # which set smaller widths).
            generator="asset",
            generator_steps=300,
            generator_lr=3e-3,
            generator_batch_size=16,
            # Judge-format yes/no lessons per training subset, from freshly drawn rows.
            matching_lessons=100,
            vocab_size=1024,
            hidden_size=128,
            num_layers=4,
            heads=4,
            kv_heads=2,
            vision_width=64,
        )
    )


def embed_config() -> ml_collections.ConfigDict:
    """The embed command's settings (configs/embed.py), which the Python API uses too
    (`g2e.Embedder.from_pretrained`), so both give the same vectors."""
    c = base_config()
    c.stages = layout.EMBED
    # No pre-resize: only the image processor's own min/max pixels.
    c.data.image_resolution = "processor"
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.model.remat = "none"
    return c


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key."""


def _fail(key: str, message: str):
    raise ConfigError(f"--config.{key}: {message}")


def split_list(value: str) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c'] (config lists are comma-separated strings)."""
    return [part.strip() for part in str(value).split(",") if part.strip()]


def validate(config: ml_collections.ConfigDict, known_stages: Sequence[str]) -> None:
    """Checks the keys every stage relies on; raises ConfigError naming the bad key.

    `known_stages` are the stage names `g2e.main` knows (its table of stages). A demo run is
    validated after `g2e.demo.prepare.point_at_demo` has pointed model_dir and the data keys at
    what its prepare_demo stage writes.
    """
    validate_settings(config, _check_stages(config, known_stages))


def validate_settings(config: ml_collections.ConfigDict, stages: Sequence[str]) -> None:
    """The checks of `validate` beyond the stage list (model, mesh, data, train, mine), for
    `stages` (e.g. the Python API's ['embed'])."""
    _check_model_and_mesh(config)
    _check_data(config, list(stages))
    _check_train(config.train)
    _check_mine(config.mine)
    _check_export_and_cache(config)


def _one_of(key: str, value, allowed: Sequence[str]) -> None:
    if value not in allowed:
        _fail(key, f"is {value!r}; use one of {', '.join(allowed)}")


def _check_stages(config: ml_collections.ConfigDict, known: Sequence[str]) -> list[str]:
    stages = split_list(config.stages)
    if not stages:
        _fail("stages", "is empty; give a comma-separated list of " + ", ".join(known))
    for key in ("stages", "force"):
        for stage in split_list(config[key]):
            if stage not in known:
                _fail(key, f"unknown stage {stage!r}; known stages: {', '.join(known)}")
    if not config.model_dir:
        _fail("model_dir", "is empty; point it at a Hugging Face Qwen2-VL directory")
    if layout.EMBED in stages:
        if not config.input:
            _fail("input", "is empty; give a JSONL file of {text, image, role} lines")
        if not config.output:
            _fail("output", "is empty; give the .npy file to write")
    return stages


def _check_model_and_mesh(config: ml_collections.ConfigDict) -> None:
    for key in ("data", "fsdp", "tensor"):
        size = config.mesh[key]
        if not isinstance(size, int) or (size < 1 and size != -1):
            _fail(f"mesh.{key}", f"is {size!r}; use a positive size or -1 for the rest")
    if sum(config.mesh[k] == -1 for k in ("data", "fsdp", "tensor")) > 1:
        _fail("mesh", "more than one axis is -1; at most one axis takes the rest")
    for key in ("dtype", "param_dtype"):
        _one_of(f"model.{key}", config.model[key], DTYPES)
    _one_of("model.remat", config.model.remat, tuple(text.REMAT_POLICIES))
    _one_of("model.attention", config.model.attention, attention.IMPLEMENTATIONS)
    for key in ("splash_block_q", "splash_block_kv"):
        block = config.model[key]
        if not isinstance(block, int) or block < 1 or block % attention.SPLASH_TILE:
            _fail(f"model.{key}", f"is {block!r}; use a multiple of {attention.SPLASH_TILE}")


def _check_data(config: ml_collections.ConfigDict, stages: list[str]) -> None:
    _check_embedding_cache(config.embedding_cache)
    _check_preprocessing(config.data)
    _check_row_selection(config.data)
    _check_data_sources(config.data, stages)


def _check_embedding_cache(cache: ml_collections.ConfigDict) -> None:
    _one_of("embedding_cache.dtype", cache.dtype, embedding_cache.CACHE_DTYPES)
    if cache.shard_size < 1:
        _fail("embedding_cache.shard_size", "must be at least 1")


def _check_preprocessing(data: ml_collections.ConfigDict) -> None:
    _one_of("data.on_bad_input", data.on_bad_input, errors.POLICIES)
    if not isinstance(data.workers, int) or data.workers < -1:
        _fail(
            "data.workers",
            f"is {data.workers!r}; use a number of processes, 0 for none or "
            "-1 for one per usable core",
        )
    for key in ("image_resolution", "train_image_resolution"):
        _one_of(f"data.{key}", data[key], images.POLICIES)
    if data.video_frames < 1:
        _fail("data.video_frames", f"is {data.video_frames}; sample at least 1 frame per video")
    for key in ("max_length", "train_max_length"):
        if data[key] < 16:
            _fail(f"data.{key}", f"is {data[key]}; it must hold the chat template (>= 16)")
    if max(data.length_buckets) < data.max_length:
        _fail(
            "data.length_buckets",
            f"largest bucket {max(data.length_buckets)} is below data.max_length="
            f"{data.max_length}; add a bucket of at least that size",
        )
    longest = max(data.max_length, data.train_max_length)
    if data.pack_length and data.pack_length < longest:
        _fail(
            "data.pack_length",
            f"is {data.pack_length}; a packed row must hold the longest input "
            f"(data.max_length / train_max_length, {longest}), or use 0 for no packing",
        )
    if data.pack_patches % 4 or data.pack_patches < 0:
        _fail("data.pack_patches", f"is {data.pack_patches}; use 0 or a multiple of 4")
    _one_of("data.format", data.format, rows.FORMATS)


def _check_row_selection(data: ml_collections.ConfigDict) -> None:
    if data.max_rows_per_subset < 0:
        _fail(
            "data.max_rows_per_subset",
            f"is {data.max_rows_per_subset}; use 0 for every row or a positive cap",
        )
    if data.row_sample_seed < -1:
        _fail(
            "data.row_sample_seed",
            f"is {data.row_sample_seed}; use -1 (the first rows) or a seed >= 0",
        )
    if data.heldout_rows < 0:
        _fail(
            "data.heldout_rows",
            f"is {data.heldout_rows}; use 0 (none held out) or a "
            "positive count per training subset",
        )


def _check_data_sources(data: ml_collections.ConfigDict, stages: list[str]) -> None:
    """The folders the chosen stages read are set."""
    if layout.EVAL_SUGARCREPE in stages:
        if not (data.sugarcrepe_dir or data.sugarcrepe_pp_dir):
            _fail(
                "data.sugarcrepe_dir",
                "and data.sugarcrepe_pp_dir are empty; point one at "
                "the folder of SugarCrepe's (or SugarCrepe++'s) <category>.json files",
            )
        if not data.sugarcrepe_image_root:
            _fail(
                "data.sugarcrepe_image_root",
                "is empty; point it at the COCO val2017 images the SugarCrepe files name",
            )
    if layout.EVAL_MMEB_V2 in stages:
        if not data.mmeb_v2_dir:
            _fail(
                "data.mmeb_v2_dir",
                "is empty; point it at the folder of MMEB-V2's Hub snapshots "
                "(its layout: g2e/data/mmeb_v2.py)",
            )
        try:
            mmeb_v2.select_tasks(data.mmeb_v2_tasks)
        except mmeb_v2.UnknownTaskError as error:
            raise ConfigError(str(error)) from None
    needs_train_data = any(s in stages for s in layout.READS_TRAIN_DATA)
    needs_eval_data = any(s in stages for s in layout.READS_EVAL_DATA)
    if data.format == "tfds":
        if (needs_train_data or needs_eval_data) and not data.tfds_dir:
            _fail(
                "data.tfds_dir",
                "is empty; with data.format=tfds point it at the data_dir "
                "`python -m g2e.data.tfds_builders` wrote to",
            )
        return
    if needs_train_data and not data.train_dir:
        _fail("data.train_dir", "is empty; point it at MMEB-train in the hub's layout")
    if needs_eval_data and not data.eval_dir:
        _fail("data.eval_dir", "is empty; point it at MMEB-eval in the hub's layout")


def _check_train(train: ml_collections.ConfigDict) -> None:
    for key in (
        "steps",
        "global_batch",
        "cluster_size",
        "checkpoint_every",
        "heldout_every",
        "keep_checkpoints",
    ):
        if train[key] < 1:
            _fail(f"train.{key}", f"is {train[key]}; it must be at least 1")
    for key in ("query_chunk", "candidate_chunk", "vision_chunk", "memory_limit_gb"):
        if train[key] < 0:
            _fail(f"train.{key}", f"is {train[key]}; use 0 (automatic) or a positive value")
    if train.global_batch % train.cluster_size:
        _fail(
            "train.global_batch",
            f"{train.global_batch} is not a multiple of "
            f"train.cluster_size={train.cluster_size}; batches hold whole clusters",
        )
    for key in ("query_chunk", "candidate_chunk"):
        if train[key] and train.global_batch % train[key]:
            _fail(
                f"train.{key}",
                f"{train[key]} does not divide train.global_batch="
                f"{train.global_batch}; a chunk must divide the rows of each device",
            )
    _one_of("train.backprop", train.backprop, BACKPROP)
    if train.temperature <= 0:
        _fail("train.temperature", f"is {train.temperature}; it must be positive")
    _one_of("train.adapter.kind", train.adapter.kind, (*lora.KINDS, "none"))
    if train.adapter.kind != "none" and train.adapter.r < 1:
        _fail("train.adapter.r", f"is {train.adapter.r}; the rank must be at least 1")
    if not 0.0 <= train.adapter.dropout < 1.0:
        _fail("train.adapter.dropout", f"is {train.adapter.dropout}; use a value in [0, 1)")


def _check_mine(mine: ml_collections.ConfigDict) -> None:
    for key in ("top_k", "pool_mult", "block_size", "batch_size", "judge_batch_size"):
        if mine[key] < 1:
            _fail(f"mine.{key}", f"is {mine[key]}; it must be at least 1")
    if not 0.0 < mine.judge_threshold < 1.0:
        _fail("mine.judge_threshold", f"is {mine.judge_threshold}; use a probability in (0, 1)")


def _check_export_and_cache(config: ml_collections.ConfigDict) -> None:
    _one_of("export.dtype", config.export.dtype, EXPORT_DTYPES)
    if config.export.max_shard_mb < 1:
        _fail("export.max_shard_mb", f"is {config.export.max_shard_mb}; it must be at least 1")
    push = config.export.push_to_hub
    if push and not hub.is_hub_id(push):
        _fail("export.push_to_hub", f"is {push!r}; use '' (no upload) or a Hub id ORG/NAME")
    cache = config.compilation_cache
    if cache.min_compile_time_secs < 0:
        _fail(
            "compilation_cache.min_compile_time_secs",
            f"is {cache.min_compile_time_secs}; use 0 or more seconds",
        )
    if cache.min_entry_size_bytes < -1:
        _fail(
            "compilation_cache.min_entry_size_bytes",
            f"is {cache.min_entry_size_bytes}; use -1 (no limit), 0 (JAX's default) or bytes",
        )
