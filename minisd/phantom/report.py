"""The report: findings in the order a radiologist dictates them, worded from a few common phrasings."""
import numpy as np


def report(case):
    """Radiology-report findings for the case, in the order a radiologist dictates them."""
    rng = np.random.default_rng(case.text_seed)
    pick = lambda *options: options[rng.integers(len(options))]
    sentences = [{
        "pacemaker": "Left chest wall pacemaker with leads in the right atrium and right ventricle.",
        "central line": "Right internal jugular central venous catheter with tip in the SVC.",
        "endotracheal tube": "Endotracheal tube tip is 4 cm above the carina.",
        "ecg leads": "Overlying EKG leads.",
    }[device] for device in case.devices]
    if case.cardiomegaly:
        degree = "Moderate" if case.heart_ratio > 0.6 else "Mild"
        sentences.append(pick("The heart is enlarged.", f"{degree} cardiomegaly.",
                              "The cardiac silhouette is enlarged."))
    else:
        sentences.append(pick("The heart is normal in size.", "Heart size is normal.",
                              "The cardiomediastinal silhouette is within normal limits."))
    if case.hyperinflation:
        sentences.append(pick("The lungs are hyperinflated with flattening of the hemidiaphragms.",
                              "Hyperinflated lungs with flattened hemidiaphragms."))
    if case.consolidation:
        lobe = case.consolidation.lobe
        sentences.append(pick(f"Focal airspace opacity in the {lobe}, concerning for pneumonia.",
                              f"Patchy consolidation in the {lobe}."))
    for nodule in case.nodules:
        sentences.append(f"{nodule.size_mm} mm nodule in the {nodule.lobe}.")
    if not case.consolidation and not case.nodules:
        sentences.append(pick("The lungs are clear.", "No focal airspace consolidation."))
    effusion = dict(case.effusion)
    if len(effusion) == 2 and effusion["right"] == effusion["left"]:
        sentences.append(f"{effusion['right'].capitalize()} bilateral pleural effusions.")
    elif len(effusion) == 2:
        sentences.append(f"Bilateral pleural effusions, {effusion['right']} on the right "
                         f"and {effusion['left']} on the left.")
    elif effusion:
        (side, size), = effusion.items()
        sentences.append(f"{size.capitalize()} {side} pleural effusion.")
    if case.pneumothorax:
        side, size = case.pneumothorax
        sentences.append(f"{size.capitalize()} {side}{' apical' if size == 'small' else ''} pneumothorax.")
    if not effusion and not case.pneumothorax:
        sentences.append("No pleural effusion or pneumothorax.")
    elif not effusion:
        sentences.append("No pleural effusion.")
    elif not case.pneumothorax:
        sentences.append("No pneumothorax.")
    return " ".join(sentences)
