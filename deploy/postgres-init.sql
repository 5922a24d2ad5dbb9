-- One database per reference service (each service owns its data).
-- Run once by the postgres image, on its first start with an empty volume.
-- "order" is a reserved word in SQL, hence the quotes.
CREATE DATABASE "order";
CREATE DATABASE inventory;
CREATE DATABASE payment;
CREATE DATABASE shipping;
