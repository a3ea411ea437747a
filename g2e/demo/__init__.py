"""The embedded demo (configs/demo.py): the whole recipe on a CPU with nothing downloaded.

prepare.py (the `prepare_demo` stage: the data, and the generator: the committed asset copied,
or a toy one trained), pretrain.py (makes the committed generator, assets/generator, with
lessons.py's curriculum and probes.py's gate), mini_mmeb.py (a mini-MMEB in the hub's formats),
mini_rows.py (its rows as drawn), scenes.py (its drawn images), siblings.py (scenes one
attribute apart), wording.py (answers' canonical and other words), tiny.py (the tiny tokenizer,
config and preprocessor files of a Qwen2-VL checkpoint made in-process).
"""
