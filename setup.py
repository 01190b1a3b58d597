from pathlib import Path

from setuptools import find_packages, setup


here = Path(__file__).parent
requirements = [
    line.strip()
    for line in (here / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="crepa-diffusers",
    version="0.1.0",
    description="CREPA (Cross-frame Representation Alignment) for diffusers video LoRA training examples",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    package_dir={"": "src"},
    packages=find_packages("src"),
    python_requires=">=3.10",
    install_requires=requirements,
    extras_require={
        "test": ["pytest>=7.4", "pytest-timeout>=2.2", "deepspeed>=0.16", "ruff==0.17.6", "decord2>=3.0.0"]
    },
)
