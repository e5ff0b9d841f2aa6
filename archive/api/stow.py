"""(filled in by issue 18)"""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
