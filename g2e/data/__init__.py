"""MMEB on the host: rows read from disk, prompts, and the fixed-shape batches the model takes.

Everything here runs on the host, in numpy; the device sees only the collated arrays, in the
few shapes the buckets allow. A row flows one way:

  rows      MMEB in the hub's parquet layout (mmeb.py) or a prepared TFDS copy (tfds_rows.py)
            -> TrainRow / EvalRow: texts with their instructions, and image paths (parquet)
            or lazy `images.ImageRef`s (TFDS). rows.py picks the source
            (`config.data.format`) and caps the training rows per subset, in one place.
  items     one side of a row -> `preprocess.EmbedItem` (text, image, role 'query' or
            'candidate'); `query_item` / `positive_item` for training rows, while the
            evaluators and the embed command build theirs from their own inputs.
  prompts   prompts.py wraps the text in the hierarchical embedding prompt (docs/method.md
            §1): a `ChatPrompt` whose `body`, the data's own text, is the only part that
            truncation may cut.
  Encoded   `Processor.encode` (preprocess.py) loads and pre-resizes the image (images.py),
            tokenises, expands each `<|image_pad|>` to the image's merged-patch count and
            truncates -> `batching.Encoded`: token ids, uint8 patches, image grids.
  arrays    `Batcher.collate` (batching.py) pads a list of Encoded to the smallest
            (length, patches) bucket -> input_ids, attention_mask, M-RoPE position_ids,
            pixel_values and the vision layout -> the jitted model step (g2e.models).
workers.py runs the Encoded step in worker processes, in input order. Bad input anywhere
(a missing image, an empty text, a text far over max_length) is an `errors.BadInput` naming
the subset, row and file, and follows `config.data.on_bad_input`.

Modules, in the order of the flow:
  mmeb.py            the hub's parquet layout -> TrainRow / EvalRow; image paths checked;
                     write_split, the one writer of that layout (synthetic and mini-MMEB)
  tfds_builders.py   MMEB as array_record TFDS files with the images in (no image folders needed)
  tfds_rows.py       such a TFDS copy read back as the same rows, images as lazy references
  rows.py            the rows a stage asks for, from either source, capped per subset
  subsets.py         each subset's meta-task and IND/OOD group (MMEB's table or subsets.json)
  prompts.py         every prompt string of g2e: embedding, chat, judge and SugarCrepe prompts
  images.py          safe image loading (the bad-input rules) and the image-resolution policies
  videos.py          video inputs (frames, a folder, a file via PyAV) sampled to data.video_frames
  patches.py         uint8 patches in the HF processors' layout (one frame for images, two for video)
  image_settings.py  the checkpoint's image processor settings and its resize rule (no torch)
  preprocess.py      EmbedItem -> Encoded, with the tokenizer and image settings of a checkpoint
  batching.py        Encoded -> fixed-shape batch arrays (buckets, M-RoPE ids, padding counts)
  workers.py         host work in Grain worker processes, in input order, in bounded memory
  errors.py          BadInput and BadInputReport: the on_bad_input policy
  synthetic_mmeb.py  data in MMEB's exact layout at any scale, for work on the host side
  mini_mmeb.py       `python -m g2e.data.mini_mmeb` runs the demo's g2e.demo.mini_mmeb
"""
