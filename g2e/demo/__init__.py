"""The embedded demo (configs/demo.py): the whole recipe on a CPU with nothing downloaded.

prepare.py (the `prepare_demo` stage: the data, and a tiny Qwen2-VL trained as a generator),
mini_mmeb.py (a mini-MMEB in the hub's formats), scenes.py (its drawn images), tiny.py (the
tiny tokenizer, config and preprocessor files of a Qwen2-VL checkpoint made in-process).
"""
