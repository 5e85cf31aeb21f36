"""The GPU check: one command runs everything a lent GPU machine should show, under a time limit.

    python3 -m benchmarks.gpu_check --out DIR            # on the GPU machine: at most 8 minutes
    python3 -m benchmarks.gpu_check --out DIR --smoke    # the same steps on the CPU at tiny sizes
    make gpu-check OUT=DIR [SMOKE=1]                     # the same, through make

Run it from the repository root, where Python finds both ``benchmarks`` and ``dali_ba``: the check
needs no install of dali-ba (each step's process gets the root on ``PYTHONPATH``). Its modules:

- ``driver``: the steps with their time limits, each run in its own process, the whole run under a budget;
- ``processes``: running a command under a limit with its log, killing its whole tree, the steps' environment;
- ``report``: the targets, and the three files of ``--out`` (JSON, Markdown, the details archive);
- ``steps``: one step in its own process (``python -m benchmarks.gpu_check.steps STEP``), by name;
- ``context``: what the steps share: the GPU and smoke sizes, a step's context, the ImageNet-like JPEGs;
- ``steps_env``, ``steps_tests``, ``steps_train``, ``steps_loader``: the steps themselves, one module per kind;
- ``torchvision_on_device``: the loader step's GPU peer, torchvision's own decode and transforms on the device.
"""
