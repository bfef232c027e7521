"""The REST API's after-deployment part: ``POST /api/v1/feedback`` and
``GET /api/v1/monitoring/{model}`` (both behind the same key as the rest of the API)."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from medlens.monitoring.signals import monitoring_report
from medlens.monitoring.store import MAX_COMMENT
from medlens.serve.api import API, get_model
from medlens.serve.record import Recorder

router = APIRouter()


class FeedbackIn(BaseModel):
    prediction_id: str = Field(
        min_length=1, max_length=64, description="the id a predict answer returned"
    )
    label: str = Field(min_length=1, max_length=200, description="the clinician's label")
    comment: str | None = Field(
        None,
        max_length=MAX_COMMENT,
        description="optional free text; it is stored as written, so write no patient "
        "identifiers in it",
    )


class FeedbackOut(BaseModel):
    feedback_id: int
    prediction_id: str
    label: str
    predicted: str = Field(description="the model's label for that prediction")
    agrees: bool
    image_kept: bool = Field(
        description="the image was kept for retraining (only when the server was started "
        "with --keep-feedback-images)"
    )


class AlertOut(BaseModel):
    signal: str = Field(description="ood_rate, psi, ks, prevalence or agreement")
    value: float
    level: float = Field(description="the level the value passed")
    message: str


class KSOut(BaseModel):
    statistic: float
    p_value: float


class SignalsOut(BaseModel):
    predictions: int
    ood_flagged: int
    ood_rate: float | None
    ood_expected_rate: float | None = Field(
        description="the share of validation images the guard was set to flag"
    )
    ood_p_value: float | None = Field(
        None, description="one-sided binomial test of the flag rate against the expected one"
    )
    feedback: int
    feedback_agreement: float | None
    label_mix: dict[str, float | None] = Field(description="share of each predicted label")
    training_prevalence: dict[str, float] | None
    em_prevalence: dict[str, float] | None = Field(
        description="prevalence estimated from the unlabelled predictions (Saerens et al. 2002)"
    )
    psi: dict[str, float] | None = Field(
        description="population stability index of each class probability against validation"
    )
    psi_noise: float | None = Field(None, description="PSI's expected sampling noise")
    ks: dict[str, KSOut] | None = Field(description="Kolmogorov-Smirnov against validation")
    alerts: list[AlertOut]


class DayOut(SignalsOut):
    day: str = Field(description="UTC date, YYYY-MM-DD")


class MonitoringOut(SignalsOut):
    model: str
    since: str
    days: int
    per_day: list[DayOut] = Field(description="the same signals per day, oldest first")
    levels: dict[str, float] = Field(description="the alert levels in force")


def recorder_of(request: Request) -> Recorder:
    """The app's recorder; 409 when the server keeps no prediction record."""
    recorder = getattr(request.app.state, "recorder", None)
    if recorder is None:
        raise StarletteHTTPException(
            409,
            "this server keeps no prediction record (it was started with --no-record); "
            "start it with --db URL (or the default record) for feedback and monitoring",
        )
    return recorder


@router.post(f"{API}/feedback", response_model=FeedbackOut, tags=["feedback"])
def post_feedback(request: Request, body: FeedbackIn) -> dict:
    """Tell the record what the right label was for a prediction ("was this right?").

    404: no prediction with that id; 422: a label the prediction's model does not have.
    """
    recorder = recorder_of(request)
    return recorder.feedback(request.app.state.models, body.prediction_id, body.label,
                             body.comment)  # fmt: skip


@router.get(f"{API}/monitoring/{{name}}", tags=["monitoring"], response_model=MonitoringOut)
def get_monitoring(
    request: Request,
    name: str,
    days: int = Query(7, ge=1, le=3650, description="how many days back, today included"),
) -> dict:
    """A served model's last days from the prediction record: predictions, OOD flags,
    feedback and agreement, the predicted-label mix against the training prevalence, the
    prevalence estimated by EM, PSI and Kolmogorov-Smirnov drift of each class probability
    against the validation split, per day and for the window, with the alerts raised."""
    model = get_model(request, name)
    return monitoring_report(recorder_of(request).store, model.name, model.folder, days)
