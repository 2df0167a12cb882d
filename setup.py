"""infinitune: fine-tune instruction-following LLMs with Ray + DeepSpeed ZeRO-3."""

import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "([^"]+)"', Path("infinitune/version.py").read_text()).group(1)

setup(
    name="infinitune",
    version=VERSION,
    description="Distributed instruction fine-tuning: WebDataset shards, Ray Train, DeepSpeed ZeRO-3.",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["infinitune", "infinitune.*"]),
    include_package_data=True,
    package_data={"infinitune": ["py.typed", "data_pipeline/nltk_data/tokenizers/punkt_tab/english/*"]},
    install_requires=[
        # A range, not a pin: GPU users bring the torch build that matches their CUDA.
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=4.56",
        "tokenizers>=0.21",
        "datasets>=3.0",
        "webdataset>=0.2.100",
        "ray[default,train]>=2.40",  # default: the dashboard that serves Ray Jobs (submit/status/logs)
        "tensorboard>=2.15",
        "safetensors>=0.4",
        "peft>=0.13",
        "accelerate>=0.30",
        "sacrebleu>=2.3",
        "rouge-score>=0.1.2",
        "matplotlib>=3.7",
        "numpy>=1.24",
        "pyarrow>=14",
        "fsspec>=2023.1",
        "pyyaml>=6",
        "pydantic>=2.7,<3",  # the config sections (use_attribute_docstrings: 2.7)
        "tqdm>=4.60",
        "psutil>=5.9",  # host memory and network interfaces (also a DeepSpeed and Ray dependency)
        "gguf>=0.10",
        "if-verifiable>=0.1.2,<0.2",  # IFEval's verifiers (Google's code), without lm-eval's weight
    ],
    extras_require={
        # moto: a local S3 for tests; import-linter: the layering contract (pyproject.toml)
        "dev": ["pytest>=8", "hypothesis>=6.100", "ruff>=0.6", "moto[server]>=5", "import-linter>=2.13", "jsonschema>=4"],
        "s3": ["s3fs"],
        "bench": ["trl>=1.16,<2"],  # bench/peers.py races TRL's SFTTrainer
    },
    entry_points={"console_scripts": ["infinitune=infinitune.launcher.cli:main"]},
    license="Apache-2.0",
    classifiers=["Programming Language :: Python :: 3"],
)
