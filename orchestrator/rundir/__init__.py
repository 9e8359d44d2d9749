"""A run folder on disk: checkpoint files and manifests (``ckpt_files``), fresh start vs resume and the stop file (``run_folder``), loading a trained model from a folder (``checkpoints``)."""
