"""experts.train: making experts — SVF with REINFORCE (reinforce), the classification task (classifier), and
few-shot mixing of existing experts by the cross-entropy method (cem). Never imports the server.
"""
