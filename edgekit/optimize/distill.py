"""Knowledge distillation (Hinton et al.): a student learns the teacher's softened outputs.

loss = alpha * CE(labels, student) + (1 - alpha) * T^2 * KL(softmax(teacher/T) || softmax(student/T))

The student is a model file, or the teacher's own architecture `width` times as wide
(fresh weights). With `baseline`, the same student (same initial weights) is also trained
on the labels alone, so the gain from the teacher is measured, not assumed.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from edgekit.errors import DataError
from edgekit.optimize import common, surgery


def _logits(model, y):
    import keras

    return keras.ops.log(keras.ops.clip(y, 1e-7, 1.0)) if common.outputs_probabilities(model) else y


def make_distiller(student, teacher, temperature: float, alpha: float):
    import keras

    probs = common.outputs_probabilities(student)

    class Distiller(keras.Model):
        def __init__(self):
            super().__init__()
            self.student, self.teacher = student, teacher
            self.teacher.trainable = False
            self.ce = keras.losses.SparseCategoricalCrossentropy(from_logits=not probs)
            self.kl = keras.losses.KLDivergence()

        def call(self, x, training=False):
            return self.student(x, training=training)

        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
            t = _logits(self.teacher, self.teacher(x, training=False))
            s = _logits(self.student, y_pred)
            soft = self.kl(keras.ops.softmax(t / temperature), keras.ops.softmax(s / temperature))
            return alpha * self.ce(y, y_pred) + (1.0 - alpha) * (temperature ** 2) * soft

    return Distiller()


def distill(teacher_path: str, data: str, *, student_path: Optional[str] = None, width: Optional[float] = None,
            temperature: float = 4.0, alpha: float = 0.5, epochs: int = 20, lr: float = 1e-3,
            val: Optional[str] = None, out: Optional[str] = None, baseline: bool = False, seed: int = 0,
            say: Callable[[str], None] = print, runs: int = 200) -> Dict[str, Any]:
    import keras

    if (student_path is None) == (width is None):
        raise DataError("give the student as --student FILE or --width W (e.g. 0.5), one of them")
    if width is not None and not 0.0 < width <= 1.0:
        raise DataError(f"--width must be in (0, 1], not {width}")
    if temperature <= 0 or not 0.0 <= alpha <= 1.0:
        raise DataError("--temperature must be > 0 and --alpha in [0, 1]")
    teacher = common.load_keras(teacher_path)
    train, val_ds = common.training_data(teacher, data, val)
    keras.utils.set_random_seed(seed)
    student = common.load_keras(student_path) if student_path else \
        surgery.rebuild(teacher, surgery.widths(teacher, width), init_only=True)
    init = [w.copy() for w in student.get_weights()]
    x = common._x(teacher, train)
    say(f"distilling into a student of {student.count_params():,} parameters (teacher "
        f"{teacher.count_params():,}), T={temperature}, alpha={alpha}, {epochs} epoch(s)")
    d = make_distiller(student, teacher, temperature, alpha)
    d.compile(optimizer=keras.optimizers.Adam(lr), metrics=["accuracy"])
    d.fit(x, train.labels, epochs=epochs, batch_size=32, verbose=0)
    result: Dict[str, Any] = {"temperature": temperature, "alpha": alpha, "epochs": epochs, "width": width,
                              "teacher": common.figures(teacher, val_ds, runs),
                              "student": common.figures(student, val_ds, runs)}
    if baseline:
        say("training the same student on labels alone (baseline)")
        keras.utils.set_random_seed(seed)
        plain = keras.models.clone_model(student)
        plain.set_weights(init)
        common.compile_for(plain, lr)
        plain.fit(x, train.labels, epochs=epochs, batch_size=32, verbose=0)
        result["student_without_teacher"] = {"accuracy": common.accuracy(plain, val_ds)}
        result["gain_from_teacher"] = result["student"]["accuracy"] - result["student_without_teacher"]["accuracy"]
    result["saved"] = str(common.save(student, out)) if out else None
    return result


__all__ = ["distill", "make_distiller"]
