"""How the bundled demo model (vllm_steer/assets/demo) was made: a small Llama trained on a
synthetic corpus of chats about five topics, and its topic vectors.

- ``corpus.py``: the corpus and the topic word lists (``CONCEPT_WORDS``);
- ``train.py``: ``python -m vllm_steer.lab.demo.train --out DIR`` reproduces the model;
- ``vectors.py``: ``python -m vllm_steer.lab.demo.vectors`` reproduces its vectors with the
  package's own extraction.
"""
