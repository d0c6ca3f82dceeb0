"""What is written to disk and read back: atomic directories, model files, training state, run
directories, and the interface (task, labels, prompt style, generation defaults) stored with a model.
"""
