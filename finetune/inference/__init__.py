"""Using a trained model, whatever trained it: loading it for use, generation, the batched decoding
engine, responses to instructions and a classifier's predictions.
"""
