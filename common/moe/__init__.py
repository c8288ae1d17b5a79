"""The FlexOlmo method: the training recipe and model, router init, assembly, opt-out, evaluation,
router tuning.
"""
