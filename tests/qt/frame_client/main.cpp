// A verified upload from Qt with nothing but QtNetwork and QCryptographicHash: a trailing
// SHA-256 frame (flags 0x06), the file read once in 4 KiB chunks, hashed while it is sent.
// Usage: frame_client HOST PORT FILE. Prints the server's answer; exit 0 on "OK …".
#include <QCoreApplication>
#include <QCryptographicHash>
#include <QDataStream>
#include <QFile>
#include <QFileInfo>
#include <QTcpSocket>
#include <QTimer>
#include <cstdio>

int main(int argc, char *argv[])
{
    QCoreApplication app(argc, argv);
    QStringList args = app.arguments();
    if (args.size() != 4) {
        fprintf(stderr, "usage: frame_client HOST PORT FILE\n");
        return 2;
    }
    QFile file(args[3]);
    if (!file.open(QIODevice::ReadOnly)) {
        fprintf(stderr, "cannot open %s\n", qPrintable(args[3]));
        return 1;
    }
    QByteArray name = QFileInfo(file).fileName().toUtf8();
    QTcpSocket *sock = new QTcpSocket(&app);
    QObject::connect(sock, &QTcpSocket::connected, [&]() {
        QByteArray head;
        QDataStream out(&head, QIODevice::WriteOnly); // big-endian by default
        out.writeRawData("\xF5" "FRY", 4);            // magic
        out << quint8(1) << quint8(0x06)              // version 1; flags: SHA-256, trailing
            << quint16(name.size()) << quint64(file.size());
        out.writeRawData(QByteArray(32, '\0').constData(), 32); // checksum: after the body
        out.writeRawData(name.constData(), name.size());
        sock->write(head);
        QCryptographicHash sha(QCryptographicHash::Sha256);
        while (!file.atEnd()) {
            QByteArray chunk = file.read(4096);
            sha.addData(chunk);
            sock->write(chunk);
            if (sock->bytesToWrite() > (1 << 20))
                sock->waitForBytesWritten(10000);
        }
        sock->write(sha.result()); // the 32-byte checksum follows the body
    });
    QObject::connect(sock, &QTcpSocket::readyRead, [&]() {
        while (sock->canReadLine()) {
            QByteArray line = sock->readLine();
            // Lines that may come before the answer: NONCE (servers with upload keys) and, in
            // chat mode, notices ("* …") and others' messages ("[…] …").
            if (!line.startsWith("OK ") && !line.startsWith("ERR "))
                continue;
            fwrite(line.constData(), 1, line.size(), stdout);
            fflush(stdout);
            app.exit(line.startsWith("OK ") ? 0 : 1);
        }
    });
    QObject::connect(sock, &QTcpSocket::errorOccurred, [&]() {
        fprintf(stderr, "socket error: %s\n", qPrintable(sock->errorString()));
        app.exit(1);
    });
    QTimer::singleShot(30000, [&]() {
        fprintf(stderr, "timed out\n");
        app.exit(1);
    });
    sock->connectToHost(args[1], args[2].toUShort());
    return app.exec();
}
