from setuptools import find_packages, setup

setup(
    name="dhkd",
    version="0.1.0",
    description="Fused Triton kernels for Dual-Head Knowledge Distillation, and a lean trainer that uses them",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["dhkd_kernels", "dhkd_kernels.*", "dhkd", "dhkd.*"]),
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "matplotlib"],
        "train": ["torchvision", "PyYAML>=6", "tqdm", "matplotlib", "mnist1d", "tensorboard", "scikit-learn"],
        "tensorboard": ["tensorboard"],
        "timm": ["timm"],
        "bench": ["liger-kernel", "cut-cross-entropy"],
        # data.backend=dali; the CUDA 13 build matches torch's cu130 wheels (nvidia-dali-cuda120 for CUDA 12)
        "dali": ["nvidia-dali-cuda130; platform_system == 'Linux' and platform_machine in 'x86_64 aarch64'"],
    },
    entry_points={"console_scripts": ["dhkd = dhkd.cli:main"]},
)
