module hdb

go 1.19
