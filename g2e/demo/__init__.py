"""The embedded demo (configs/demo.py): the whole recipe on a CPU with nothing downloaded.

prepare.py (the `prepare_demo` stage: the data, and a tiny Qwen2-VL trained as a generator),
mini_mmeb.py (a mini-MMEB in the hub's formats), mini_rows.py (its rows as drawn), scenes.py
(its drawn images), siblings.py (scenes one attribute apart), wording.py (answers' canonical
and other words), tiny.py (the tiny tokenizer, config and preprocessor files of a Qwen2-VL
checkpoint made in-process).
"""
