"""Applications built on models/, datasets/ and hubconf.py: the inference API and command (``tools.inference``,
``python -m tools.predict``), export (``python -m tools.export``), drawings (``tools.visualize``), benchmarks
(``python -m tools.benchmarks.<name>``) and the GPU check (``python -m tools.gpu_check``). Run them from the
repository root. util/ holds the helpers they stand on and imports nothing from here."""
