-- The Optuna study storage: its own database (MLflow and Optuna both keep an alembic_version table).
-- Set its password afterwards: ALTER USER optuna PASSWORD '...'; clients read it from PGPASSWORD.
CREATE USER optuna;
CREATE DATABASE optuna OWNER optuna;
