#!/bin/sh
# Run once by the postgres image on an empty data volume (docker-entrypoint-initdb.d), as the
# superuser: the roles mlflow and optuna (no superuser, no CREATEDB/CREATEROLE) and their
# databases. Passwords are read from the environment inside psql (\getenv), never on a command
# line; each database is closed to everyone but its owner.
set -eu
export MLFLOW_DB_USER="${MLFLOW_DB_USER:-mlflow}" MLFLOW_DB_NAME="${MLFLOW_DB_NAME:-mlflow}" \
  MLFLOW_AUTH_DB_NAME="${MLFLOW_AUTH_DB_NAME:-mlflow_auth}" \
  OPTUNA_DB_USER="${OPTUNA_DB_USER:-optuna}" OPTUNA_DB_NAME="${OPTUNA_DB_NAME:-optuna}"
: "${MLFLOW_DB_PASSWORD:?set MLFLOW_DB_PASSWORD}" "${OPTUNA_DB_PASSWORD:?set OPTUNA_DB_PASSWORD}"
psql -v ON_ERROR_STOP=1 --no-psqlrc --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" <<'SQL'
\getenv mlflow_user MLFLOW_DB_USER
\getenv mlflow_password MLFLOW_DB_PASSWORD
\getenv mlflow_db MLFLOW_DB_NAME
\getenv auth_db MLFLOW_AUTH_DB_NAME
\getenv optuna_user OPTUNA_DB_USER
\getenv optuna_password OPTUNA_DB_PASSWORD
\getenv optuna_db OPTUNA_DB_NAME
CREATE ROLE :"mlflow_user" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'mlflow_password';
CREATE ROLE :"optuna_user" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'optuna_password';
CREATE DATABASE :"mlflow_db" OWNER :"mlflow_user";
CREATE DATABASE :"auth_db" OWNER :"mlflow_user";
CREATE DATABASE :"optuna_db" OWNER :"optuna_user";
REVOKE ALL ON DATABASE :"mlflow_db" FROM PUBLIC;
REVOKE ALL ON DATABASE :"auth_db" FROM PUBLIC;
REVOKE ALL ON DATABASE :"optuna_db" FROM PUBLIC;
SQL
