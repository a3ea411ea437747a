"""`python -m g2e.data.mini_mmeb` still runs the mini-MMEB generator, now g2e.demo.mini_mmeb."""

if __name__ == "__main__":
    import runpy

    runpy.run_module("g2e.demo.mini_mmeb", run_name="__main__", alter_sys=True)
