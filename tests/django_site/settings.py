"""The smallest Django project that runs ``runserver`` behind httpready (tests/test_django_werkzeug.py)."""

SECRET_KEY = "test-only"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = ["tests.django_site"]
ROOT_URLCONF = "tests.django_site.urls"
MIDDLEWARE: list[str] = []
DATABASES: dict[str, object] = {}
USE_TZ = True
