"""Prompt helpers of lm-eval 0.4.13's own tasks (super_glue/copa/utils.py,
winogrande/preprocess_winogrande.py, hellaswag/utils.py, super_glue/cb/aggregate.py),
copied so our YAMLs can name them as `!function dejavu.tasks.utils.<name>`."""
import re


def _lower_first(choice):
    return choice[0].lower() + choice[1:]


def copa_doc_to_text(doc):
    connector = {"cause": "because", "effect": "therefore"}[doc["question"]]
    return doc["premise"].strip()[:-1] + f" {connector}"  # drop the period


def copa_doc_to_target(doc):
    correct = doc["choice1"] if doc["label"] == 0 else doc["choice2"]
    return " " + _lower_first(correct)


def copa_doc_to_choice(doc):
    return [" " + _lower_first(doc["choice1"]), " " + _lower_first(doc["choice2"])]


# winogrande scores the sentence after the blank given each option ("partial evaluation"):
# the contexts vary and the continuation is shared, so doc_to_text gives the answer index.
def winogrande_doc_to_text(doc):
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc):
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc):
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]


def _hellaswag_clean(text):
    text = text.strip()
    text = text.replace(" [title]", ". ")  # brackets are artifacts of the WikiHow part
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_process_docs(dataset):
    def one(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {"query": _hellaswag_clean(doc["activity_label"] + ": " + ctx),
                "choices": [_hellaswag_clean(e) for e in doc["endings"]],
                "gold": int(doc["label"])}
    return dataset.map(one)


def cb_multi_f1(items):
    """Macro F1 over CB's three classes (entailment, contradiction, neutral)."""
    import numpy as np
    from sklearn.metrics import f1_score
    preds, golds = (np.array(x) for x in zip(*items))
    return float(np.mean([f1_score(y_true=golds == c, y_pred=preds == c) for c in range(3)]))
