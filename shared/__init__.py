"""The Ray-free core of kizuna-stream: models, protocols, codecs, frame pools, the viewer.

Nothing here imports Ray; the actors in ``actors/`` wrap these pieces.
"""
