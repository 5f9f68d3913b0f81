"""The referee: diffusers' own test mixins, from a diffusers checkout's tests/ tree (PyPI's sdist lacks it), run
against the project's diffusers classes. DIFFUSERS_TESTS names the checkout (the directory holding tests/); unset,
each referee module skips itself. How to run it and the last counts: tests/referee/README.md."""

# the marks diffusers' mixins put on their tests (registered by its own tests/conftest.py, which is not collected)
MARKS = (
    *("training", "attention", "compile", "memory", "cpu_offload", "group_offload", "lora", "ip_adapter"),
    *("single_file", "quantization", "bitsandbytes", "quanto", "torchao", "gguf", "modelopt", "sdnq", "autoround"),
    *("context_parallel", "tensor_parallel", "big_accelerator", "nightly"),
)


def pytest_configure(config):
    for mark in MARKS:
        config.addinivalue_line("markers", f"{mark}: a diffusers test-mixin mark")
