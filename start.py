"""Start the API server with the settings from env/.env.<ENVIRONMENT> and the environment."""

from __future__ import annotations

import uvicorn

from application.config import get_settings
from application.main import create_app


def main() -> None:
    settings = get_settings()
    uvicorn.run(create_app(settings), host=settings.bind_host, port=settings.APP_PORT, log_config=None)


if __name__ == "__main__":
    main()
