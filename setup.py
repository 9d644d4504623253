"""xhrnet_tf: X-HRNet human pose estimation in TensorFlow / tf_keras, mobile-first."""
from setuptools import find_packages, setup

setup(
    name="xhrnet_tf",
    version="0.1.0",
    description="X-HRNet (ICME 2022) lightweight human pose estimation for TensorFlow and TFLite",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["xhrnet_tf", "xhrnet_tf.*"]),
    package_data={"xhrnet_tf": ["configs/*.yaml"]},
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "tf-keras>=2.21,<2.22",
        "tensorflow-model-optimization>=0.8.1,<0.9",
        "ai-edge-litert>=2.0,<3",
        "numpy>=1.26,<3",
        "pycocotools>=2.0.7,<3",
        "opencv-python-headless>=4.9,<5",
        "absl-py>=1.2,<2",
        "PyYAML>=6.0,<7",
        "tensorboard>=2.20,<3",
    ],
    extras_require={
        "dev": ["pytest>=8,<10", "pytest-xdist>=3.5,<4"],
        # Only needed to read official .pth checkpoints; .npz needs nothing extra.
        "torch": ["torch>=2.0"],
    },
)
